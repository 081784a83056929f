"""Whoever can write to the topic must not control the workers: forged
announcements against a real master, broker and worker. Each test is named
after a way the worker could be abused, and checks that the record was
refused (logged with its offset, kept as a dead-letter record, its offset
committed) while nothing outside the store moved and the table kept its rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import Env, wait_for
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from spot_ingest.bus import Announcement, Announcer, PartitionReader
from spot_ingest.config import KafkaConfig


class Trust:
    """One running master and worker with two files loaded, and a forger."""

    def __init__(self, env: Env, files: list[Path], victim: Path):
        self.env, self.files, self.victim = env, files, victim
        self.bootstrap = f"{env.data['kafka']['kafka_server']}:{env.data['kafka']['kafka_port']}"
        self.kafka = KafkaConfig(env.data["kafka"]["kafka_server"], int(env.data["kafka"]["kafka_port"]))
        self.staged = {p.name.split("-", 1)[1]: p
                       for p in (env.warehouse / "flow" / "binary").rglob("*nfcapd.*")}
        self.expected = flow_reference_rows(files)

    def genuine(self, name: str) -> Announcement:
        path = self.staged[name]
        data = path.read_bytes()
        return Announcement(self.env.pipeline, "flow", str(path.relative_to(self.env.warehouse)),
                            len(data), hashlib.sha256(data).hexdigest(), name,
                            int(time.time() * 1000), "forger")

    def send(self, record: Announcement) -> int:
        announcer = Announcer(self.kafka, self.env.topic, 1, self.env.pipeline)
        try:
            return announcer.announce(record, partition=0)[1]
        finally:
            announcer.close()

    def send_raw(self, value: bytes) -> int:
        from kafka import KafkaProducer
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        try:
            return producer.send(self.env.topic, value, partition=0).get(timeout=30).offset
        finally:
            producer.close()

    def committed(self) -> int:
        reader = PartitionReader(self.kafka, self.env.topic, 0, self.env.pipeline)
        try:
            return reader.committed() or 0
        finally:
            reader.close()

    def wait_refused(self, offset: int, reason: str) -> dict:
        """The record at ``offset`` was refused for ``reason`` and committed past."""
        wait_for(lambda: self.committed() > offset, 60, f"a commit past offset {offset}")
        found = list((self.env.warehouse / "flow" / "refused").rglob(f"*-p0-o{offset}.json"))
        assert len(found) == 1, "a dead-letter record for the refused offset"
        dead = json.loads(found[0].read_text())
        assert reason in dead["reason"], dead["reason"]
        assert f"refused offset {offset} of {self.env.topic}" in self.env.log("worker-0.log")
        return dead

    def table_intact(self) -> None:
        assert flow_table_rows(self.env.table()) == self.expected
        assert len(list(self.env.hive.rglob("*.parquet"))) == len(self.files)
        for name, path in self.staged.items():
            assert path.exists(), f"staged {name} still in place"


@pytest.fixture(scope="module")
def trust(tmp_path_factory, broker):
    root = tmp_path_factory.mktemp("trust")
    env = Env(root, broker)
    src = root / "src"
    files = [make_nfcapd_file(src / "nfcapd.202611210100", 2000, seed=61),
             make_nfcapd_file(src / "nfcapd.202611210105", 10, seed=62)]
    for f in files:
        shutil.copyfile(f, env.collector / f.name)
    victim = make_nfcapd_file(root / "elsewhere" / "nfcapd.victim", 300, seed=63)
    env.worker(0)
    env.master(1)
    wait_for(lambda: env.row_count() == 2010, 120, "the two genuine files")
    trust = Trust(env, files, victim)
    # The offset is committed after the rows are in place: each test starts
    # from a partition whose every record is committed.
    wait_for(lambda: trust.committed() == 2, 60, "both announcements committed")
    yield trust
    env.stop_all()


def test_wrong_size_on_a_path_outside_the_store_moves_nothing(trust):
    before = trust.victim.read_bytes()
    offset = trust.send(replace(trust.genuine("nfcapd.202611210100"),
                                staged_path=str(trust.victim), size=1))
    trust.wait_refused(offset, "outside the store")
    offset = trust.send(replace(trust.genuine("nfcapd.202611210100"),
                                staged_path=str(trust.env.hive), size=1))
    trust.wait_refused(offset, "not under flow/binary/")
    assert trust.victim.read_bytes() == before
    assert not (trust.env.warehouse / "flow" / "quarantine").exists()
    trust.table_intact()


def test_dotdot_path_is_refused(trust):
    offset = trust.send(replace(trust.genuine("nfcapd.202611210100"),
                                staged_path="flow/binary/../hive", size=1))
    trust.wait_refused(offset, "'..'")
    trust.table_intact()


def test_file_outside_the_store_with_the_right_size_is_not_loaded(trust):
    data = trust.victim.read_bytes()
    offset = trust.send(replace(trust.genuine("nfcapd.202611210100"), staged_path=str(trust.victim),
                                size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    trust.wait_refused(offset, "outside the store")
    trust.table_intact()


def test_directory_fifo_device_and_symlink_are_refused(trust):
    binary = trust.env.warehouse / "flow" / "binary"
    day = next(binary.iterdir())
    genuine = trust.genuine("nfcapd.202611210100")
    fifo = day / "fifo-nfcapd"
    os.mkfifo(fifo)
    link = day / "link-nfcapd"
    os.symlink(trust.victim, link)
    cases = [(str(day.relative_to(trust.env.warehouse)), "not a regular file"),
             (str(fifo.relative_to(trust.env.warehouse)), "not a regular file"),
             (str(link.relative_to(trust.env.warehouse)), "cannot be opened safely"),
             ("/dev/zero", "outside the store")]
    for staged, reason in cases:
        offset = trust.send(replace(genuine, staged_path=staged))
        trust.wait_refused(offset, reason)
    assert link.is_symlink() and fifo.exists(), "refused paths are left as they are"
    trust.table_intact()


def test_wrong_sha256_never_doubles_or_overwrites_rows(trust):
    big, small = trust.genuine("nfcapd.202611210100"), trust.genuine("nfcapd.202611210105")
    # The big file again under another checksum would have doubled its rows.
    offset = trust.send(replace(big, sha256="0" * 64))
    trust.wait_refused(offset, "the announcement says " + "0" * 64)
    # The 10-flow file under the big file's checksum would have replaced its 2,000 rows.
    offset = trust.send(replace(small, sha256=big.sha256))
    trust.wait_refused(offset, f"the announcement says {big.sha256}")
    trust.table_intact()


def test_sha256_with_slashes_does_not_block_the_partition(trust):
    offset = trust.send(replace(trust.genuine("nfcapd.202611210100"), sha256="../../" + "a" * 58))
    dead = trust.wait_refused(offset, "is not 64 hex digits")
    assert dead["record"]["sha256"].startswith("../../")
    # And a record that is not an announcement at all.
    offset = trust.send_raw(b"\x07 garbage")
    trust.wait_refused(offset, "not an announcement")
    trust.table_intact()


def test_store_briefly_missing_is_waited_for_not_refused(trust):
    """An NFS mount that is down looks like an empty directory: nothing is
    refused or committed until it is back, and then the file loads."""
    store = trust.env.warehouse
    offline = store.with_name("warehouse.offline")
    genuine = trust.genuine("nfcapd.202611210105")
    os.rename(store, offline)
    store.mkdir()
    try:
        committed = trust.committed()
        offset = trust.send(replace(genuine, original_name="again\nFORGED log line"))
        wait_for(lambda: "is not reachable" in trust.env.log("worker-0.log"), 60,
                 "the worker to say the store is not reachable")
        assert trust.committed() == committed == offset, "nothing committed while the store is away"
    finally:
        store.rmdir()
        os.rename(offline, store)
    wait_for(lambda: trust.committed() > offset, 120, "the load once the store is back")
    log = trust.env.log("worker-0.log")
    assert "loaded again\\nFORGED log line" in log and "\nFORGED" not in log
    trust.table_intact()


def test_signed_announcements_unsigned_or_forged_are_refused(tmp_path, broker):
    """With signing_key_file, only records signed with the key are taken, the
    end-of-run marker included."""
    import json as _json
    import subprocess

    from conftest import REPO
    key = tmp_path / "signing.key"
    key.write_text("k" * 40 + "\n")
    (tmp_path / "signed").mkdir()
    env = Env(tmp_path / "signed", broker)
    env.data["signing_key_file"] = str(key)
    env.config.write_text(_json.dumps(env.data))
    try:
        src = make_nfcapd_file(tmp_path / "src" / "nfcapd.202611210200", 700, seed=64)
        shutil.copyfile(src, env.collector / src.name)
        env.worker(0)
        env.master(1)
        wait_for(lambda: env.row_count() == 700, 120, "the signed genuine file")
        trust = Trust(env, [src], src)
        genuine = trust.genuine(src.name)
        offset = trust.send(genuine)                       # unsigned
        trust.wait_refused(offset, "unsigned")
        forged = Announcer(trust.kafka, env.topic, 1, env.pipeline, signing_key=b"x" * 40)
        try:
            offset = forged.announce(genuine, partition=0)[1]
        finally:
            forged.close()
        trust.wait_refused(offset, "bad signature")
        trust.table_intact()
        # A signing key that is too short is refused when the configuration loads.
        key.write_text("short\n")
        result = subprocess.run([str(REPO / "master_collector.py"), "-t", env.pipeline, "-w", "1",
                                 "-c", str(env.config)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "signing_key_file: " in result.stderr and "holds 5 bytes" in result.stderr
    finally:
        env.stop_all()
