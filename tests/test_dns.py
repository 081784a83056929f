"""DNS pipeline: captures made by tcpdump of dnsmasq answering real queries on
loopback, decoded by real editcap and tshark, compared with tshark's own
reading of the same files (its -T json output, parsed by Python's json)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import REPO, STORES
from reference import dns_reference_rows, dns_table_rows
from spot_ingest.pipelines.dns import DNS
from spot_ingest.pipelines.dns.sample import make_dns_capture
from spot_ingest.config import PipelineConfig
from spot_ingest.pipeline import BadInputError


def convert(path, cfg=None) -> pa.Table:
    return pa.Table.from_batches(list(DNS.convert(Path(path), cfg)), DNS.full_schema)


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    path, answers = make_dns_capture(tmp_path_factory.mktemp("dns") / "lo.pcap", 400, seed=3)
    assert answers == 400
    return path


def test_rows_match_tsharks_own_reading(capture):
    table = convert(capture)
    assert table.num_rows == 400
    assert dns_table_rows(table) == dns_reference_rows([capture])


def test_separators_quotes_answers_and_ipv6_survive(capture):
    rows = convert(capture).to_pylist()
    names = {r["dns_qry_name"] for r in rows}
    assert 'quote"and,comma.wild.test' in names and "sp ace.wild.test" in names
    assert "semi;colon$(x).wild.test" in names
    # Control characters and invalid UTF-8 arrive as tshark escapes them.
    assert "ctl\\001a\\002b\\nc.wild.test" in names and "bad\ufffdutf8.wild.test" in names
    assert all(", 2026 " in r["frame_time"] and r["frame_time"].endswith(" UTC") for r in rows)
    multi = [r for r in rows if r["dns_qry_name"] == "multi.example.test"]
    assert multi and all(sorted(r["dns_a"].split(",")) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
                         for r in multi)
    v6 = [r for r in rows if r["ip_src"] == "::1"]
    assert v6 and all(r["ip_dst"] == "::1" for r in v6)
    assert {r["dns_qry_rcode"] for r in rows} == {0, 3, 5}   # answered, NXDOMAIN, REFUSED
    assert all(r["dns_qry_class"] == "0x0001" for r in rows)


def test_partitions_follow_each_packets_own_hour(capture, tmp_path):
    # editcap shifts a copy by an hour and mergecap joins them: a capture spanning two hours.
    later = tmp_path / "later.pcap"
    subprocess.run(["editcap", "-t", "3600", str(capture), str(later)], check=True)
    both = tmp_path / "both.pcapng"
    subprocess.run(["mergecap", "-w", str(both), str(capture), str(later)], check=True)
    rows = convert(both).to_pylist()
    assert len(rows) == 800
    hours = {(r["y"], r["m"], r["d"], r["h"]) for r in rows}
    assert len(hours) == 2
    import datetime
    for r in rows:
        t = datetime.datetime.fromtimestamp(r["unix_tstamp"], datetime.timezone.utc)
        assert (r["y"], r["m"], r["d"], r["h"]) == (t.year, t.month, t.day, t.hour)


def test_split_into_chunks_loses_and_doubles_nothing(capture, tmp_path):
    cfg = dns_config(tmp_path, pkt_num=150)
    work = tmp_path / "work"
    work.mkdir()
    chunks = list(DNS.split(capture, work, cfg))
    assert len(chunks) == 6  # 800 packets (queries and answers) in chunks of 150
    rows = [r for c in chunks for r in dns_table_rows(convert(c))]
    assert sorted(rows, key=repr) == dns_reference_rows([capture])


def test_truncated_capture_keeps_the_packets_before_the_cut(capture, tmp_path, caplog):
    data = capture.read_bytes()
    # Cut inside a packet (not on a record boundary): walk the pcap records.
    import struct
    pos, starts = 24, []
    while pos + 16 <= len(data):
        starts.append(pos)
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    inside = starts[len(starts) * 2 // 3] + 16 + 5
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:inside])
    table = convert(cut)
    assert 0 < table.num_rows < 400
    assert dns_table_rows(table) == dns_reference_rows([cut])
    assert "truncated" in caplog.text and "cut.pcap" in caplog.text


def test_text_file_named_pcap_is_bad_input(tmp_path):
    fake = tmp_path / "notes.pcap"
    fake.write_text("these are not packets\n" * 20)
    with pytest.raises(BadInputError, match="notes.pcap"):
        list(DNS.split(fake, tmp_path, dns_config(tmp_path)))


def test_malformed_dns_packets_do_not_stop_the_decoder(tmp_path):
    rnd = tmp_path / "random.pcap"
    subprocess.run(["randpkt", "-t", "dns", "-c", "500", str(rnd)], check=True)
    table = convert(rnd)
    assert dns_table_rows(table) == dns_reference_rows([rnd])


def test_original_process_opt_still_works_and_bad_options_are_named():
    original = ("-E separator=, -E header=y -E occurrence=f -T fields -e frame.time "
                "-e frame.time_epoch -e frame.len -e ip.src -e ip.dst -e dns.resp.name "
                "-e dns.resp.type -e dns.resp.class -e dns.flags.rcode -e dns.a "
                "'dns.flags.response == 1'")
    opts = DNS.parse_options({"process_opt": original}, lambda k, p: ValueError(f"{k}: {p}"))
    assert opts.filters == () and opts.tshark_args == ()
    opts = DNS.parse_options({"process_opt": "-d udp.port==5353,dns dns.qry.type == 1"},
                             lambda k, p: ValueError(f"{k}: {p}"))
    assert opts.tshark_args == ("-d", "udp.port==5353,dns")
    with pytest.raises(ValueError, match=r"process_opt: tshark option -w is not allowed"):
        DNS.parse_options({"process_opt": "-w out.pcap"}, lambda k, p: ValueError(f"{k}: {p}"))


def dns_config(tmp_path, pkt_num=650000, process_opt="") -> PipelineConfig:
    raw = {"pkt_num": pkt_num, "process_opt": process_opt}
    return PipelineConfig("dns_test", "dns", tmp_path, tmp_path, process_opt, (".pcap",), "t", 1,
                          1.0, None, True, DNS.parse_options(raw, lambda k, p: ValueError(p)))


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_end_to_end_chunks_spread_over_workers(make_env, capture, tmp_path):
    env = make_env("dns", pipeline="dns_test", ptype="dns", pkt_num=100,
                   supported_files=[".pcap"], worker_processes=1)
    shutil.copyfile(capture, env.collector / "a.pcap")
    # A second, different capture: the same traffic a day later (editcap -t).
    later = tmp_path / "b.pcap"
    subprocess.run(["editcap", "-t", "86400", str(capture), str(later)], check=True)
    shutil.copyfile(later, env.collector / "b.pcap")
    rnd = tmp_path / "random.pcap"
    subprocess.run(["randpkt", "-t", "dns", "-c", "300", str(rnd)], check=True)
    shutil.copyfile(rnd, env.collector / "random.pcap")
    (env.collector / "fake.pcap").write_text("not a capture\n")
    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                             "-c", str(env.config)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, "a file was set aside, so the run reports failure"
    expected = sorted(dns_reference_rows([capture, later]) + dns_reference_rows([rnd]), key=repr)
    table = env.table()
    assert dns_table_rows(table) == expected
    logs = [env.log(f"{env.pipeline}-worker-{i}.log") for i in (0, 1)]
    assert all(log.count("loaded ") >= 2 for log in logs), "both workers decoded chunks"
    master_log = env.log(f"{env.pipeline}-master.log")
    assert "a.pcap (8 pieces" in master_log and "b.pcap (8 pieces" in master_log
    assert "fake.pcap" in master_log and "editcap could not read" in master_log
    quarantined = list((env.staging / "quarantine" / env.pipeline).glob("fake.pcap*"))
    assert len(quarantined) == 2   # the file and its .reason.txt


# --- Scale-out: chunks announced while the capture is split, a split redone ---

def pcap_records(data: bytes) -> list[bytes]:
    """The records (16-byte header and packet) of a classic little-endian pcap."""
    import struct
    pos, records = 24, []
    while pos + 16 <= len(data):
        end = pos + 16 + struct.unpack_from("<I", data, pos + 8)[0]
        records.append(data[pos:end])
        pos = end
    return records


def pcapng_packets(path: Path) -> list[bytes]:
    """The packet bytes of each Enhanced Packet Block of a (little-endian)
    pcapng file, in order: what editcap wrote into a chunk."""
    import struct
    data, pos, packets = path.read_bytes(), 0, []
    while pos + 12 <= len(data):
        kind, length = struct.unpack_from("<II", data, pos)
        if kind == 6:
            caplen = struct.unpack_from("<I", data, pos + 20)[0]
            packets.append(data[pos + 28:pos + 28 + caplen])
        pos += length
    return packets


def repeated(capture: Path, dest: Path, copies: int) -> Path:
    """``copies`` time-shifted copies of the capture one after the other: the
    same exchanges ``copies`` times, each row distinct (its time differs)."""
    parts = []
    for i in range(copies):
        part = dest.parent / f"{dest.stem}.part{i}.pcap"
        subprocess.run(["editcap", "-F", "pcap", "-t", str(i * 60), str(capture), str(part)],
                       check=True)
        parts.append(part)
    subprocess.run(["mergecap", "-a", "-F", "pcap", "-w", str(dest), *map(str, parts)], check=True)
    for part in parts:
        part.unlink()
    return dest


def topic_records(bootstrap: str, topic: str) -> list:
    """Every record of the topic."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def drop(env, src: Path) -> None:
    """Put a capture in the collector directory at once (renamed into place)."""
    tmp = env.collector / f".{src.name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, env.collector / src.name)


def broker_pid(broker) -> int:
    import psutil
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == broker[1] and c.status == psutil.CONN_LISTEN:
            return c.pid
    raise AssertionError(f"nothing listens on port {broker[1]}")


def test_a_chunk_comes_while_editcap_is_still_reading_the_capture(capture, tmp_path):
    """Deterministic: editcap reads the capture from a FIFO that the test
    holds open, so it cannot have finished when the first chunk is yielded."""
    import threading
    import psutil
    data = capture.read_bytes()
    records = pcap_records(data)
    fifo = tmp_path / "live.pcap"
    os.mkfifo(fifo)
    rest = threading.Event()

    def feed():
        with open(fifo, "wb") as f:              # opens once editcap does
            f.write(data[:24] + b"".join(records[:250]))  # chunks 1 and 2 whole, 3 begun
            f.flush()
            rest.wait(60)
            f.write(b"".join(records[250:]))
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    work = tmp_path / "work"
    work.mkdir()
    chunks = DNS.split(fifo, work, dns_config(tmp_path, pkt_num=100))
    first = next(chunks)
    editcap = [p for p in psutil.Process().children() if p.name() == "editcap"]
    assert editcap and editcap[0].status() != psutil.STATUS_ZOMBIE, \
        "editcap is still reading when the first chunk comes"
    assert pcapng_packets(first) == [r[16:] for r in records[:100]]
    rest.set()
    all_chunks = [first, *chunks]
    feeder.join(10)
    assert len(all_chunks) == 8
    assert [p for c in all_chunks for p in pcapng_packets(c)] == [r[16:] for r in records]
    rows = [r for c in all_chunks for r in dns_table_rows(convert(c))]
    assert sorted(rows, key=repr) == dns_reference_rows([capture])


def test_master_announces_each_chunk_before_it_asks_for_the_next(make_env, capture, tmp_path,
                                                                  monkeypatch):
    """The staging step (FileDelivery.take, as a master's staging process runs
    it, with the real editcap, store and broker): when the split is asked
    for chunk k + 1, chunk k is in the store and on the topic."""
    from kafka import KafkaConsumer, TopicPartition
    from spot_ingest import master
    from spot_ingest.bus import Announcement, ensure_topic
    from spot_ingest.config import load
    env = make_env("dns", pipeline="dns_test", ptype="dns", pkt_num=100,
                   supported_files=[".pcap"])
    shutil.copyfile(capture, env.collector / "a.pcap")
    cfg = load(env.config)
    pcfg = cfg.pipeline("dns_test")
    ensure_topic(cfg.kafka, pcfg.topic, 2)
    consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap, group_id=None)
    tps = [TopicPartition(pcfg.topic, p) for p in (0, 1)]
    binary = env.warehouse / "dns" / "binary"
    real_split = type(DNS).split
    seen = []

    def watched_split(path, workdir, c):
        for piece in real_split(DNS, path, workdir, c):
            # The engine asks for this piece: what has it announced and staged so far?
            seen.append((sum(consumer.end_offsets(tps).values()),
                         len(list(binary.rglob("*a.pcap.*"))) if binary.exists() else 0))
            yield piece
        seen.append((sum(consumer.end_offsets(tps).values()), len(list(binary.rglob("*a.pcap.*")))))
    monkeypatch.setattr(DNS, "split", watched_split)
    monkeypatch.setattr(master, "_piece_announcer", None)
    try:
        taken = master.FileDelivery(cfg, pcfg, 2).take(env.collector / "a.pcap", "a.pcap",
                                                       (env.collector / "a.pcap").stat().st_mtime)
    finally:
        if master._piece_announcer is not None:
            master._piece_announcer[1].close()
        consumer.close()
    assert taken.announced == 8 and taken.damage is None
    assert seen == [(k, k) for k in range(9)], "chunk k announced and staged before chunk k + 1"
    records = [Announcement.decode(r.value) for r in topic_records(cfg.kafka.bootstrap, pcfg.topic)]
    assert sorted(r.chunk_index for r in records) == list(range(8))
    assert {r.source_sha256 for r in records} == {taken.sha256}
    assert {r.original_name for r in records} == {f"a.pcap [{k}]" for k in range(1, 9)}
    assert not list(env.staging.glob("dns_test-split-*")), "the split folder is removed"


def test_chunk_order_survives_editcap_numbering_from_00000_again(tmp_path):
    """editcap numbers chunks modulo 100,000; chunk_00000_* after chunk_99999_*
    is the newest, not the oldest. A plain file's chunks are made large
    enough that it never comes to that."""
    from spot_ingest.pipelines.dns import _chunks, chunk_size, MAX_CHUNKS
    for name in ("chunk_99998_20261122000000.pcapng", "chunk_99999_20261122000001.pcapng",
                 "chunk_00000_20261122000002.pcapng", "editcap.stderr"):
        (tmp_path / name).write_bytes(b"")
    run, after_gap = _chunks(tmp_path, set(), 99998)
    assert [p.name[:11] for p in run] == ["chunk_99998", "chunk_99999", "chunk_00000"]
    assert after_gap == 0
    run, after_gap = _chunks(tmp_path, {"chunk_99998_20261122000000.pcapng"}, 99999)
    assert [p.name[:11] for p in run] == ["chunk_99999", "chunk_00000"] and after_gap == 0
    # A listing made while editcap adds files can show a chunk without the
    # one before it: only the run up to the gap comes.
    (tmp_path / "chunk_00002_20261122000004.pcapng").write_bytes(b"")
    run, after_gap = _chunks(tmp_path, {"chunk_99998_20261122000000.pcapng"}, 99999)
    assert [p.name[:11] for p in run] == ["chunk_99999", "chunk_00000"] and after_gap == 1
    big = tmp_path / "big.pcap"
    with open(big, "wb") as f:
        f.truncate(16 * 10 * MAX_CHUNKS)            # room for 1,000,000 empty records
    assert chunk_size(big, 1) == 11 and chunk_size(big, 100_000) == 100_000
    assert chunk_size(tmp_path / "x.pcap.gz", 1) == 1


def test_tiny_chunks_stay_in_order_and_stop_before_editcap_reuses_names(capture, tmp_path):
    """pkt_num 1 over 104,000 packets: a plain capture gets chunks large
    enough for fewer than 100,000 of them; a compressed one, whose packets
    its size does not bound, stops at 99,999 chunks, every packet before in
    order, with a reason naming pkt_num."""
    import gzip
    from spot_ingest.pipeline import DamagedInputError
    big = tmp_path / "big.pcap"
    subprocess.run(["mergecap", "-a", "-F", "pcap", "-w", str(big), *[str(capture)] * 130],
                   check=True)
    packets = [r[16:] for r in pcap_records(big.read_bytes())]
    assert len(packets) == 104_000
    cfg = dns_config(tmp_path, pkt_num=1)

    def split_all(path):
        work = tmp_path / f"work-{path.name}"
        work.mkdir()
        got, chunks = [], 0
        try:
            for chunk in DNS.split(path, work, cfg):
                got += pcapng_packets(chunk)
                chunk.unlink()                 # as the master does once it is staged
                chunks += 1
        except DamagedInputError as exc:
            return got, chunks, str(exc)
        return got, chunks, None
    got, chunks, problem = split_all(big)
    assert problem is None and got == packets and 10_000 < chunks < 100_000
    gz = tmp_path / "big.pcap.gz"
    with open(big, "rb") as f, gzip.open(gz, "wb", compresslevel=1) as g:
        shutil.copyfileobj(f, g)
    got, chunks, problem = split_all(gz)
    assert chunks == 99_999 and got == packets[:99_999]
    assert "the first 99999 are loaded" in problem and "set pkt_num above 1" in problem


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_master_killed_mid_split_redoes_the_file_and_doubles_no_row(make_env, capture, tmp_path,
                                                                    broker):
    """A master killed after some chunks of a capture were announced (the
    workers load them meanwhile) and before the rest were split: the next
    master splits the file again, stages the chunks under the same names and
    announces them all; the workers load the repeated chunks into the same
    files. Every response once, the split folder of the killed master gone."""
    import signal
    from conftest import wait_for
    env = make_env("dns", pipeline="dns_kill", ptype="dns", pkt_num=100,
                   supported_files=[".pcap"], settle_seconds=0.2, worker_processes=1)
    (tmp_path / "src").mkdir()
    big = repeated(capture, tmp_path / "src" / "big.pcap", 5)
    pieces = 40                                   # 4,000 packets in chunks of 100
    expected = dns_reference_rows([big])
    env.worker(0)
    env.worker(1)
    drop(env, big)
    binary = env.warehouse / "dns" / "binary"
    master = env.master(2)
    # The second chunk staged: the first was announced (acknowledged) before
    # the split was asked for it. Then the broker stops answering, so the
    # master can announce nothing more, and it is killed.
    wait_for(lambda: binary.exists() and len(list(binary.rglob("*big.pcap.*"))) >= 2, 60,
             "two chunks staged", interval=0.001)
    pid = broker_pid(broker)
    os.kill(pid, signal.SIGSTOP)
    try:
        env.kill(master)
    finally:
        os.kill(pid, signal.SIGCONT)
    announced = topic_records(f"{broker[0]}:{broker[1]}", env.topic)
    assert 1 <= len(announced) < pieces, "killed in the middle of the split"
    assert (env.collector / "big.pcap").exists(), "the file stays until every chunk is announced"
    assert list(env.staging.glob("dns_kill-split-*")), "the killed master's split folder is left"
    # The workers load the chunks announced before the kill: rows of a file
    # whose split never finished.
    wait_for(lambda: sum(env.log(f"worker-{i}.log").count("loaded big.pcap [") for i in (0, 1))
             >= len(announced), 120, "the announced chunks loaded")
    assert 0 < env.row_count() < len(expected)
    env.master(2)
    wait_for(lambda: not (env.collector / "big.pcap").exists(), 120, "the file taken again")
    wait_for(lambda: sum(env.log(f"worker-{i}.log").count("loaded big.pcap [") for i in (0, 1))
             >= len(announced) + pieces, 300, "every announcement loaded")
    assert dns_table_rows(env.table()) == expected
    assert len({p.name for p in env.hive.rglob("*.parquet")}) == pieces, \
        "a repeated chunk replaced its own file"
    staged = list(binary.rglob("*big.pcap.*"))
    assert len(staged) == pieces, "chunks staged again under the same names"
    master_log = env.log("master.log")
    assert "removed 1 split folder(s)" in master_log
    assert not list(env.staging.glob("dns_kill-split-*"))
    # Each chunk announced as it was split, in order, before the file's own line.
    lines = master_log.splitlines()
    done = next(i for i, line in enumerate(lines) if "staged and announced big.pcap (40 pieces"
                in line)
    second_run = [i for i, line in enumerate(lines) if "announced big.pcap [" in line][-pieces:]
    assert [int(lines[i].split("big.pcap [")[1].split("]")[0]) for i in second_run] == \
        list(range(1, pieces + 1))
    assert second_run[-1] < done


def test_master_start_removes_only_its_own_split_folders(make_env):
    """What a killed master left in its scratch directory goes at the next
    start; another pipeline's folders, and names take() never makes, stay."""
    from spot_ingest import master
    from spot_ingest.config import load
    env = make_env("dns", pipeline="dns_test", ptype="dns", supported_files=[".pcap"])
    env.staging.mkdir(parents=True, exist_ok=True)
    mine = env.staging / "dns_test-split-ab_cd123"
    mine.mkdir()
    (mine / "chunk_00000_20261122000000.pcapng").write_bytes(b"left by a killed master")
    kept = [env.staging / name for name in ("dns_test2-split-abcdefgh", "dns_test-split-abcdefgh-1",
                                           "dns_test-split-ABCDEFGH", "dns_test-split-abc")]
    for p in kept:
        p.mkdir()
    cfg = load(env.config)
    master.FileDelivery(cfg, cfg.pipeline("dns_test"), 1).check()
    assert not mine.exists() and all(p.is_dir() for p in kept)


# --- The sample capture: made without privileges, the same traffic tcpdump sees ---

# Run as root, a fresh Python imports what it needs (its interpreter may be
# under /root, out of nobody's reach), then becomes nobody for good, with no
# capabilities, and makes the capture. on_ready reports dnsmasq's port (and
# the user dnsmasq runs as) on stdout and waits for a line on stdin: the test
# starts tcpdump in between.
AS_NOBODY = r"""
import json, os, pwd, sys
import psutil
from spot_ingest.pipelines.dns.sample import make_dns_capture
dest, queries, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))

def on_ready(port):
    dnsmasq = [(p.name(), p.uids().effective) for p in psutil.Process().children()]
    print(json.dumps({"port": port, "dnsmasq": dnsmasq}), flush=True)
    sys.stdin.readline()

path, answers = make_dns_capture(dest, queries, seed, on_ready=on_ready)
print(json.dumps({"path": str(path), "answers": answers, "euid": os.geteuid(),
                  "cap_eff": int(status["CapEff"], 16)}), flush=True)
"""

COMPARED = ("eth.src", "eth.dst", "eth.type", "frame.len", "ip.src", "ip.dst", "ip.len", "ip.ttl",
            "ip.flags.df", "ipv6.src", "ipv6.dst", "ipv6.plen", "ipv6.hlim", "udp.srcport",
            "udp.dstport", "udp.length", "dns.id", "dns.flags.response", "dns.qry.name",
            "dns.qry.type", "dns.flags.rcode", "dns.count.answers", "dns.a", "dns.aaaa")


def tshark_fields(path, fields, *options) -> list[tuple]:
    out = subprocess.run(["tshark", "-n", "-r", str(path), *options, "-T", "fields",
                          *[arg for f in fields for arg in ("-e", f)]],
                         capture_output=True, check=True).stdout
    return [tuple(line.split("\t")) for line in out.decode("utf-8", "replace").splitlines()]


def read_line(stream, timeout: float = 60) -> bytes:
    import select
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout:.0f} s"
    return stream.readline()


def test_sample_capture_needs_no_root_and_matches_tcpdump(tmp_path):
    import pwd
    import sys
    import tempfile
    from spot_ingest.pipelines.dns.sample import Capture
    queries = 300
    nobody = pwd.getpwnam("nobody")
    out_dir = Path(tempfile.mkdtemp(prefix="dns-nobody-"))   # /tmp: pytest's tmp_path is root's only
    os.chown(out_dir, nobody.pw_uid, nobody.pw_gid)
    tcpdump = None
    # PATH without /usr/sbin: dnsmasq is found where Debian puts it all the same.
    proc = subprocess.Popen([sys.executable, "-c", AS_NOBODY, str(out_dir / "ours.pcap"),
                             str(queries), "11"], cwd=REPO, bufsize=0, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    try:
        ready = read_line(proc.stdout)
        assert ready, proc.communicate(timeout=60)[1].decode(errors="replace")
        ready = json.loads(ready)
        assert ready["dnsmasq"] == [["dnsmasq", nobody.pw_uid]]
        tcpdump = Capture(tmp_path / "tcpdump.pcap", ready["port"])   # root records lo
        out, err = proc.communicate(b"go\n", timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")
        done = json.loads(out.splitlines()[-1])
        assert done["euid"] == nobody.pw_uid and done["cap_eff"] == 0
        assert done["answers"] == queries
        ours = Path(done["path"])
        assert ours.stat().st_uid == nobody.pw_uid
        tcpdump.wait_for_packets(2 * queries)
        captured, dropped = tcpdump.close()
        tcpdump = None
        assert (captured, dropped) == (2 * queries, 0)

        # tshark reads the same DNS traffic, headers included, from both files.
        mine, theirs = (tshark_fields(p, ("frame.time_epoch",) + COMPARED)
                        for p in (ours, tmp_path / "tcpdump.pcap"))
        assert len(mine) == len(theirs) == 2 * queries
        assert sorted(r[1:] for r in mine) == sorted(r[1:] for r in theirs)
        assert {(r[1], r[2]) for r in mine} == {("00:00:00:00:00:00", "00:00:00:00:00:00")}
        ports = {r[COMPARED.index("udp.srcport") + 1] for r in mine}
        assert str(ready["port"]) in ports and len(ports) == 3   # dnsmasq, the v4 and v6 sockets
        assert {r[COMPARED.index("dns.flags.rcode") + 1] for r in mine} >= {"0", "3", "5"}

        # Times: each packet's within 1 s of tcpdump's, in time order, every
        # answer after its query.
        times = [float(r[0]) for r in mine]
        assert times == sorted(times)
        matched = zip(sorted(mine, key=lambda r: r[1:]), sorted(theirs, key=lambda r: r[1:]))
        assert all(abs(float(a[0]) - float(b[0])) < 1 for a, b in matched)
        ident, response = COMPARED.index("dns.id") + 1, COMPARED.index("dns.flags.response") + 1
        position = {(r[ident], r[response]): i for i, r in enumerate(mine)}
        assert all(position[(r[ident], "0")] < i for i, r in enumerate(mine) if r[response] == "1")

        # Checksums verified by tshark: all good; nothing malformed, no expert notes.
        checks = tshark_fields(ours, ("ipv6.src", "udp.checksum.status", "ip.checksum.status",
                                      "_ws.malformed", "_ws.expert.severity"),
                               "-o", "udp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
        assert len(checks) == 2 * queries
        assert all(c[1] == "1" and c[2] == ("" if c[0] else "1") and c[3:] == ("", "")
                   for c in checks), [c for c in checks if c[1] != "1" or c[3:] != ("", "")][:3]
        assert sum(1 for c in checks if c[0]) == 2 * queries // 5   # two in ten go over IPv6
    finally:
        if tcpdump is not None:
            tcpdump.close()
        if proc.poll() is None:
            proc.stdin.close()   # on_ready stops waiting; the capture finishes and cleans up
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(out_dir)


def test_sample_without_dnsmasq_says_what_to_install(tmp_path, monkeypatch):
    from spot_ingest.pipelines.dns import sample
    from spot_ingest.pipeline import ToolMissingError
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sample, "DNSMASQ_DIRS", (str(tmp_path),))
    with pytest.raises(ToolMissingError) as caught:
        make_dns_capture(tmp_path / "out" / "none.pcap", 10)
    assert str(caught.value) == ("the dns sample needs dnsmasq (not found on PATH, /usr/sbin or "
                                 "/sbin); install it: apt-get install dnsmasq-base")
    assert not (tmp_path / "out" / "none.pcap").exists()
    with pytest.raises(SystemExit, match=r"^error: the dns sample needs dnsmasq .*dnsmasq-base$"):
        sample.main([str(tmp_path / "none.pcap"), "--queries", "5"])


# -- process_opt: an allow-list of tshark options, and a display filter that
#    can never let a packet that is not a response into the table

def dns_options(process_opt: str):
    return DNS.parse_options({"process_opt": process_opt}, lambda k, p: ValueError(f"{k}: {p}"))


def tshark_prefs() -> list[tuple[str, str]]:
    """(name, description of its type) of every preference of the installed tshark."""
    out = subprocess.run(["tshark", "-G", "defaultprefs"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120).stdout
    prefs = []
    for block in out.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and ":" in lines[-1] and not lines[-1].startswith("# "):
            prefs.append((lines[-1].lstrip("#").split(":")[0], "\n".join(lines[:-1])))
    return prefs


@pytest.mark.parametrize("opt, named", [
    ("-o tls.debug_file:{out}", "tshark preference tls.debug_file"),
    ("-otls.debug_file:{out}", "tshark preference tls.debug_file"),
    ("-no tls.debug_file:{out}", "tshark preference tls.debug_file"),
    ("-o dns.debug_file:{out}", "tshark preference dns.debug_file"),
    ("-o tls.keylog_file:{out}", "tshark preference tls.keylog_file"),
    ("-o ssl.keylog_file:{out}", "tshark preference ssl.keylog_file"),
    ("-o uat:esp_sa:{out}", "tshark preference uat"),
    ("-o gui.column.format:x", "tshark preference gui.column.format"),
    ("--log-file={out}", "tshark option --log-file is not allowed"),
    ("-d --log-file={out}", "tshark option -d '--log-file="),
    ("-nw {out}", "tshark option -w is not allowed"),
    ("-w{out}", "tshark option -w is not allowed"),
    ("-2 -R dns -w {out}", "tshark option -R is not allowed"),
    ("-r {out}", "tshark option -r is not allowed"),
    ("--export-objects http,{out}", "tshark option --export-objects is not allowed"),
    ("-K {out}", "tshark option -K is not allowed"),
    ("-o dns.retransmission_timer:{out}", "tshark option -o 'dns.retransmission_timer:"),
])
def test_process_opt_that_names_a_file_is_refused(tmp_path, opt, named):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        dns_options(opt.format(out=out))
    message = str(info.value)
    assert message.startswith("process_opt: ") and named in message, message
    assert "\n" not in message
    assert not out.exists()


def test_debug_file_preference_would_write_a_file(capture, tmp_path):
    # For real, into tmp_path: tshark writes the file named by tls.debug_file,
    # capture with no TLS or not; the dns pipeline refuses the preference.
    out = tmp_path / "tls-debug.txt"
    subprocess.run(["tshark", "-n", "-r", str(capture), "-o", f"tls.debug_file:{out}",
                    "-T", "fields", "-e", "frame.number"], capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=120)
    assert out.is_file() and out.stat().st_size > 0
    out.unlink()
    with pytest.raises(ValueError, match=r"tshark preference tls\.debug_file .* not allowed"):
        dns_options(f"-o tls.debug_file:{out}")
    assert not out.exists()


def test_allowed_preference_is_passed_and_decodes(capture, tmp_path):
    prefs = {name for name, _ in tshark_prefs()}
    assert {"dns.retransmission_timer", "dns.desegment_dns_messages"} <= prefs
    opts = dns_options("-o dns.retransmission_timer:7 -odns.desegment_dns_messages:FALSE")
    assert opts.tshark_args == ("-o", "dns.retransmission_timer:7",
                                   "-o", "dns.desegment_dns_messages:FALSE")
    cfg = dns_config(tmp_path, process_opt="-o dns.retransmission_timer:7")
    assert dns_table_rows(convert(capture, cfg)) == dns_reference_rows([capture])
    # tshark itself checks the preference when the configuration is loaded.
    with pytest.raises(ValueError, match=r'process_opt: tshark refuses it: -o flag '
                                         r'"dns.no_such_pref:1" specifies unknown preference'):
        dns_options("-o dns.no_such_pref:1")


def test_preferences_allowed_by_module_name_none_a_file():
    from spot_ingest.pipelines.dns import ALLOWED_PREF_MODULES
    allowed_types = ("TRUE or FALSE", "A decimal number", "One of:", "A hexadecimal number",
                     "positive integer range")
    prefs = tshark_prefs()
    assert len(prefs) > 1000
    allowed = [(n, t) for n, t in prefs if n.split(".")[0] in ALLOWED_PREF_MODULES]
    assert len(allowed) > 30
    for name, kind in allowed:
        assert any(a in kind for a in allowed_types), (name, kind)
    # Every preference that is a path, of any module, is refused without running tshark.
    paths = [n for n, t in prefs if "A path to a" in t]
    assert len(paths) > 10 and "tls.keylog_file" in paths and "tls.debug_file" in paths
    for name in paths:
        with pytest.raises(ValueError, match=f"tshark preference {name} "):
            dns_options(f"-o {name}:x")


@pytest.mark.parametrize("process_opt, problem", [
    ("'1) || (1'", "it closes a parenthesis it did not open"),
    ("-Y '1) || (1'", "it closes a parenthesis it did not open"),
    ("'dns.qry.name == \"x\") || (1'", "it closes a parenthesis it did not open"),
    ("--display-filter='dns) || (dns'", "it closes a parenthesis it did not open"),
    ("\"frame.len == ')' ) || (frame.len == '('\"", "it closes a parenthesis it did not open"),
    ("'dns.qry.name == \"x\" || (1'", "a parenthesis is not closed"),
    ("'dns.qry.name == \"x) || (1'", "a quoted string is not closed"),
    ("$'dns\\n) || (dns'", None),
])
def test_filter_that_escapes_the_responses_only_conjunction_is_refused(process_opt, problem):
    with pytest.raises(ValueError) as info:
        dns_options(process_opt)
    message = str(info.value)
    assert message.startswith("process_opt: "), message
    if problem:
        assert "cannot be combined with 'dns.flags.response == 1'" in message
        assert message.endswith(problem)


@pytest.mark.parametrize("escape", [
    "dns) || (dns",
    "dns.flags.response == 0) || (dns",
    'dns.qry.name == "x") || (dns',
    "dns.flags.response == 0) || (dns.flags.response == 0",   # queries only
])
def test_no_query_reaches_the_table_whatever_the_filter(capture, tmp_path, escape):
    # The filter handed to the worker as is (as if the checks at load were
    # bypassed): tshark then prints queries too, and the worker drops them.
    opts = dataclasses.replace(dns_options(""), filters=(escape,))
    cfg = dataclasses.replace(dns_config(tmp_path), options=opts)
    cmd = DNS.tshark_command(capture, opts)
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=120, env={**os.environ, "TZ": "UTC"}).stdout.splitlines()
    flags = [line.split("\x01")[-1] for line in out]
    assert flags.count("0") >= 400            # the escape is real: tshark printed queries
    table = convert(capture, cfg)
    reference = dns_reference_rows([capture])
    assert table.num_rows == flags.count("1")
    assert set(dns_table_rows(table)) <= set(reference)
    assert table.num_rows in (0, 400)          # no row, or exactly the 400 responses


def test_filter_with_parentheses_inside_quotes_is_accepted(capture, tmp_path):
    process_opt = "'dns.qry.name contains \"a)b\" || dns.qry.name contains \"(x)\"'"
    opts = dns_options(process_opt)
    assert opts.filters == ('dns.qry.name contains "a)b" || dns.qry.name contains "(x)"',)
    rows = convert(capture, dns_config(tmp_path, process_opt=process_opt)).to_pylist()
    assert rows and {r["dns_qry_name"] for r in rows} == {"semi;colon$(x).wild.test"}
    assert dns_options("-Y 'dns.qry.name == r\"a\\\\\" || dns.qry.name contains \"a(\\\")b\"'") \
        .filters == ('dns.qry.name == r"a\\\\" || dns.qry.name contains "a(\\")b"',)


def test_tshark_checks_each_filter_at_load():
    with pytest.raises(ValueError) as info:
        dns_options("'dns.qry.nmae == 1'")
    assert str(info.value).startswith("process_opt: tshark refuses the display filter "
                                      "'dns.qry.nmae == 1': ")
    assert "dns.qry.nmae" in str(info.value)
    with pytest.raises(ValueError, match=r"tshark refuses the display filter 'dns -w /x'"):
        dns_options("dns -w /x")      # the first operand ends tshark's options


def test_options_parsed_as_tshark_getopt_does():
    assert dns_options("-nYdns.qry.type==1 -Tfields -Eseparator=,").filters == (
        "dns.qry.type==1",)
    opts = dns_options("-d udp.port==5353,dns --disable-protocol=llmnr "
                       "--enable-heuristic teredo_udp dns.qry.type == 1")
    assert opts.tshark_args == ("-d", "udp.port==5353,dns", "--disable-protocol", "llmnr",
                                   "--enable-heuristic", "teredo_udp")
    assert opts.filters == ("dns.qry.type == 1",)
    assert dns_options("-l -q -2 -- 'dns.flags.response == 1'").filters == ()
    with pytest.raises(ValueError, match=r"tshark option -z is not allowed"):
        dns_options("-nz io,stat,1")
    with pytest.raises(ValueError, match=r"tshark option -Y needs a value"):
        dns_options("-n -Y")
