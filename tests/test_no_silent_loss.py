"""Normal situations that used to lose data without an error: each test is
named after one, runs the real master (and worker where rows matter), and
checks that nothing was lost and that the logs say what happened."""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

from conftest import REPO, wait_for
from reference import dns_reference_rows, dns_table_rows
from spot_ingest.pipelines.dns.sample import make_dns_capture
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from spot_ingest.broker import EmbeddedBroker


def once(env, workers: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, str(workers),
                           "--once", "-c", str(env.config)], capture_output=True, text=True,
                          timeout=timeout)


def test_damaged_capture_is_loaded_in_part_and_kept_with_the_reason(make_env, tmp_path):
    env = make_env("dns", pipeline="dns_damage", ptype="dns", supported_files=[".pcap"],
                   pkt_num=7)
    capture, _ = make_dns_capture(tmp_path / "whole.pcap", 20, seed=5)
    data = bytearray(capture.read_bytes())
    starts, pos = [], 24
    while pos + 16 <= len(data):
        starts.append(pos)
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    struct.pack_into("<I", data, starts[24] + 8, 0x7FFFFFFF)   # a record header gone bad
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(bytes(data))
    shutil.copyfile(damaged, env.collector / "damaged.pcap")

    result = once(env)
    assert result.returncode != 0, "a file was set aside: the run says so"
    expected = dns_reference_rows([damaged])      # the responses before the damage
    assert 0 < len(expected) < 20
    assert dns_table_rows(env.table()) == expected
    master = env.log(f"{env.pipeline}-master.log")
    assert "announced the readable part of" in master
    assert "24 packet(s) before the damage are loaded" in master
    kept = env.staging / "quarantine" / env.pipeline / "damaged.pcap"
    assert kept.read_bytes() == damaged.read_bytes(), "the original is kept whole"
    assert "appears to be damaged or corrupt" in Path(f"{kept}.reason.txt").read_text()


def test_set_aside_files_of_the_same_name_do_not_overwrite_each_other(make_env):
    env = make_env("same", supported_files=["nfcapd.*"])
    for folder, content in (("router1", b""), ("router2", b"")):
        (env.collector / folder).mkdir()
        (env.collector / folder / "nfcapd.202611210000").write_bytes(content)
    once(env)
    aside = env.staging / "quarantine" / env.pipeline
    names = sorted(p.name for p in aside.iterdir())
    assert names == ["nfcapd.202611210000", "nfcapd.202611210000.1",
                     "nfcapd.202611210000.1.reason.txt", "nfcapd.202611210000.reason.txt"]
    reasons = [(aside / n).read_text() for n in names if n.endswith(".reason.txt")]
    assert any("router1" in r for r in reasons) and any("router2" in r for r in reasons)


def test_file_with_a_255_byte_name_is_loaded_and_the_run_ends(make_env, tmp_path):
    env = make_env("long")
    name = "nfcapd." + "x" * 248
    assert len(name.encode()) == 255
    make_nfcapd_file(env.collector / name, 500, seed=41)
    result = once(env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "flow table: 500 rows" in result.stdout
    staged = [p.name for p in (env.warehouse / "flow" / "binary").rglob("*nfcapd*")]
    assert len(staged) == 1 and len(staged[0].encode()) <= 255 and "+" in staged[0]


def test_file_dated_after_9999_is_rejected_not_forgotten(make_env):
    # ext4 cannot hold such a time; tmpfs can (a collector on any 64-bit-time file system).
    collector = Path(tempfile.mkdtemp(prefix="spot-y10k-", dir="/dev/shm"))
    try:
        env = make_env("y10k", collector_path=str(collector))
        path = make_nfcapd_file(collector / "nfcapd.202611210000", 100, seed=42)
        year_10000 = 253402300800 + 400 * 86400
        os.utime(path, (year_10000, year_10000))
        assert path.stat().st_mtime == year_10000
        result = once(env, timeout=120)
        assert result.returncode != 0
        master = env.log(f"{env.pipeline}-master.log")
        assert "cannot be announced: the record does not decode" in master
        kept = env.staging / "quarantine" / env.pipeline / "nfcapd.202611210000"
        assert kept.exists() and not path.exists()
    finally:
        shutil.rmtree(collector, ignore_errors=True)


def test_file_changed_after_it_was_read_is_kept_and_taken_again(make_env, tmp_path):
    """A writer appends after the master read the file (it paused longer than
    settle_seconds): the master must not delete the grown file."""
    with EmbeddedBroker() as own:
        env = make_env("grow", settle_seconds=0.2)
        env.set(**{"kafka.kafka_port": str(own.port)})
        src = make_nfcapd_file(tmp_path / "nfcapd.202611210500", 800, seed=43)
        target = env.collector / src.name
        master = env.master(1)
        wait_for(lambda: "watching" in env.log("master.log"), 60, "the master to start")
        own.proc.send_signal(signal.SIGSTOP)   # the announcement will wait for the broker
        try:
            shutil.copyfile(src, target)
            binary = env.warehouse / "flow" / "binary"
            wait_for(lambda: binary.exists() and list(binary.rglob("*nfcapd*")), 60,
                     "the file to be staged")
            with open(target, "ab") as f:    # the writer comes back
                f.write(b"appended later")
        finally:
            own.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: "changed while it was being ingested" in env.log("master.log"), 120,
                 "the master to notice the change")
        wait_for(lambda: len(list(binary.rglob("*nfcapd*"))) == 2, 60,
                 "the grown file to be staged again")
        versions = sorted(p.stat().st_size for p in binary.rglob("*nfcapd*"))
        assert versions == [src.stat().st_size, src.stat().st_size + len(b"appended later")]
        wait_for(lambda: not target.exists(), 60, "the file to be let go once unchanged")
        assert master.poll() is None
