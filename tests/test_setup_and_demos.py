"""What a newcomer runs first: the set-up script, the repository's scripts
without an activated environment, and the demos. The demos as a normal user,
and the whole path on a freshly installed system, are in
test_fresh_system.py (a normal user cannot enter a clone under /root, where
CI may put this one); test_dns.py runs the dns sample as a normal user."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SYSTEM_PYTHON = Path("/usr/bin/python3")   # the distribution's, without our dependencies


def test_setup_run_again_has_nothing_to_do():
    started = time.monotonic()
    result = subprocess.run([str(REPO / "scripts" / "setup.sh"), "--test"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("script", ["master_collector.py", "worker.py"])
def test_scripts_switch_to_the_project_environment_by_themselves(script):
    assert SYSTEM_PYTHON.exists()
    lacks_deps = subprocess.run([str(SYSTEM_PYTHON), "-c", "import kafka"], capture_output=True)
    assert lacks_deps.returncode != 0, "the system Python must not have the dependencies"
    result = subprocess.run([str(SYSTEM_PYTHON), str(REPO / script), "--help"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "-t PIPELINE" in result.stdout and "--config FILE" in result.stdout


def demo_config(root: Path, broker, pipeline: str, ptype: str, **keys) -> Path:
    pipe = {"type": ptype, "collector_path": str(root / "collector"),
            "local_staging": str(root / "staging"), "settle_seconds": 0.5,
            "worker_processes": 1, **keys}
    data = {"dbname": "spot", "hdfs_app_path": str(root / "warehouse"), "log_dir": str(root / "logs"),
            "collector_processes": 1, "ingestion_interval": 0.2,
            "kafka": {"kafka_server": broker[0], "kafka_port": str(broker[1])},
            "pipelines": {pipeline: pipe}}
    (root / "collector").mkdir(parents=True)
    path = root / "ingest_conf.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def run_demo(config: Path, pipeline: str, user: str | None = None, timeout: float = 300):
    cmd = [str(REPO / "start_standalone_ingest.sh"), pipeline, "2", "--demo", "-c", str(config)]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")


def test_flow_demo_starts_clean_and_leaves_configured_directories_alone(tmp_path, broker,
                                                                        nfcapd_files):
    config = demo_config(tmp_path, broker, "flow_demo", "flow")
    mine = tmp_path / "collector" / "nfcapd.202611210000"
    shutil.copyfile(nfcapd_files[0], mine)   # a user's file: the demo must not take it

    first = run_demo(config, "flow_demo")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "flow table: 20000 rows in 1 partition(s)" in first.stdout
    sandbox = tmp_path / "staging" / "demo" / "flow_demo"
    assert f"under {sandbox}/warehouse/flow/hive" in first.stdout

    # A failed earlier demo left a capture in the sandbox's collector.
    shutil.copyfile(nfcapd_files[1], sandbox / "collector" / "nfcapd.leftover")
    second = run_demo(config, "flow_demo")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "flow table: 20000 rows in 1 partition(s)" in second.stdout

    assert mine.read_bytes() == nfcapd_files[0].read_bytes()
    assert not (tmp_path / "warehouse").exists(), "the configured store was not touched"

    query = re.search(r"query it, e\.g\.: (.*)", second.stdout).group(1)
    shown = subprocess.run(["bash", "-c", query], capture_output=True, text=True, cwd=REPO,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "20000" in shown.stdout


def test_missing_tool_is_one_line_naming_the_package(tmp_path, broker):
    config = demo_config(tmp_path, broker, "flow_demo", "flow")
    result = subprocess.run([str(VENV_PYTHON), "-m", "spot_ingest.cli", "standalone", "flow_demo",
                             "1", "--demo", "-c", str(config)], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={**os.environ, "PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "needs nfdump" in errors[0] and "apt-get install nfdump" in errors[0]
