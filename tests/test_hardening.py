"""Hardening: what spot-ingest creates gets the configured modes whatever the
umask, and a conversion that runs too long is killed, retried, set aside."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

from conftest import REPO
from spot_ingest.pipelines.flow.sample import make_nfcapd_file


def run_once(env, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "1", "--once",
                           "-c", str(env.config)], capture_output=True, text=True, timeout=300,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def modes_under(root) -> dict[str, set[int]]:
    found = {"files": set(), "dirs": set()}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found["dirs"].add(stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode))
        for f in filenames:
            found["files"].add(stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode))
    return found


def test_created_files_get_the_configured_modes_whatever_the_umask(make_env, tmp_path):
    env = make_env("modes")
    make_nfcapd_file(env.collector / "nfcapd.202611210000", 300, seed=51)
    (env.collector / "nfcapd.empty").write_bytes(b"")          # set aside
    result = run_once(env, umask=0)
    assert "flow table: 300 rows" in result.stdout, result.stdout + result.stderr
    store = modes_under(env.warehouse)
    aside = modes_under(env.staging / "quarantine")
    assert store["files"] == {0o640} and store["dirs"] == {0o750}, store
    assert aside["files"] == {0o640} and aside["dirs"] == {0o750}, aside

    env2 = make_env("modes2")
    env2.set(file_mode="0660", dir_mode="0770")
    make_nfcapd_file(env2.collector / "nfcapd.202611210000", 300, seed=52)
    run_once(env2, umask=0o077)
    assert modes_under(env2.warehouse) == {"files": {0o660}, "dirs": {0o770}}


def test_a_conversion_past_the_time_limit_is_killed_retried_and_set_aside(make_env, tmp_path):
    env = make_env("slow", convert_timeout=0.2)
    big = make_nfcapd_file(tmp_path / "nfcapd.202611210100", 200_000, seed=53)
    shutil.copyfile(big, env.collector / big.name)
    result = run_once(env)
    assert result.returncode != 0
    worker = env.log(f"{env.pipeline}-worker-0.log")
    assert worker.count("nfdump was killed after the time limit of 0.2 s for one file") == 3
    assert "retry 1 in" in worker and "retry 2 in" in worker
    assert f"quarantined {big.name}: nfdump was killed after the time limit" in worker
    assert "flow table: 0 rows" in result.stdout
    assert list((env.warehouse / "flow" / "quarantine").rglob("*nfcapd.202611210100"))
