"""What a Spark driver started from spot-ingest needs around it: the right
Python for its workers, a Java it can run on, loopback-only listening sockets
unless configured otherwise, and the engine's code shipped without leaving
files behind.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .pipeline import ToolMissingError

REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_JAVA = 17          # PySpark 4
DEFAULT_BIND_ADDRESS = "127.0.0.1"
CODE_DIR_PREFIX = "spot-ingest-code-"


def java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java_home() -> str | None:
    """JAVA_HOME as given, else the ``java`` on PATH if new enough, else a
    Java 17+ installed beside an older default (Debian 11 and Ubuntu 22.04
    default to Java 11; setup.sh installs openjdk-17 next to it)."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    on_path = shutil.which("java")
    if on_path and (java_major(on_path) or 0) >= MIN_JAVA:
        return None     # Spark finds it on PATH
    for home in sorted(Path("/usr/lib/jvm").glob("*"), reverse=True):
        java = home / "bin" / "java"
        if java.is_file() and (java_major(str(java)) or 0) >= MIN_JAVA:
            return str(home)
    found = f"java on PATH is version {java_major(on_path)}" if on_path else "no java on PATH"
    raise ToolMissingError(f"the streaming job needs Java {MIN_JAVA} or newer ({found}); install "
                           f"it: apt-get install openjdk-17-jre-headless, or set JAVA_HOME")


def prepare_environment(bind_address: str = DEFAULT_BIND_ADDRESS) -> None:
    """Set the environment the Spark JVM and its Python workers start from.

    * Spark's Python workers run this interpreter (a virtual environment's
      packages, pyarrow among them, are not in the system ``python3``).
    * The driver and its UI listen on ``bind_address`` only: Spark's UI binds
      every interface unless ``SPARK_LOCAL_IP`` says otherwise.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", bind_address)
    home = find_java_home()
    if home:
        os.environ["JAVA_HOME"] = home


class CodeArchive:
    """The engine and the pipelines as a zip for executors on other hosts, in a
    private temporary directory that is removed when the job ends. Archives
    of jobs that were killed are removed at the next start."""

    # folder in the repository -> where it is in the package
    FOLDERS = {"spot_ingest": "spot_ingest", "pipelines": "spot_ingest/pipelines"}

    def __init__(self):
        self.dir: Path | None = None

    def __enter__(self) -> str:
        remove_stale_archives()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{CODE_DIR_PREFIX}{os.getpid()}-"))
        target = self.dir / "spot-ingest-code.zip"
        with zipfile.ZipFile(target, "w") as z:
            for folder, package in self.FOLDERS.items():
                for f in sorted((REPO_ROOT / folder).rglob("*")):
                    if f.suffix in (".py", ".avsc") and not f.is_symlink():
                        z.write(f, f"{package}/{f.relative_to(REPO_ROOT / folder)}")
        return str(target)

    def __exit__(self, *exc) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def remove_stale_archives() -> int:
    """Remove code archives of this user's jobs that no longer run."""
    import psutil
    removed = 0
    for d in Path(tempfile.gettempdir()).glob(f"{CODE_DIR_PREFIX}*"):
        pid = d.name[len(CODE_DIR_PREFIX):].split("-")[0]
        try:
            mine = d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed
