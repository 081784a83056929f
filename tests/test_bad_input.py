"""Hostile and broken input: each gets a clear message naming the file, is set
aside with its reason, and never stops or spoils the rest of the ingest."""
from __future__ import annotations

import os
import shutil
import subprocess

from conftest import REPO
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow.sample import make_nfcapd_file

HOSTILE_NAMES = [
    "nfcapd.with space", "nfcapd.quote'and\"double", "nfcapd.semi;colon",
    "nfcapd.$(touch PWNED)", "nfcapd.`touch PWNED2`", "nfcapd.new\nline",
    os.fsdecode(b"nfcapd.bad-\xff\xfe-utf8"), "-nfcapd.leading-dash", "--help-nfcapd",
]


def test_hostile_names_broken_files_symlinks_and_size_limit(make_env, tmp_path):
    env = make_env("bad", supported_files=["*nfcapd*"], max_file_size=2_000_000)
    good = []
    for i, name in enumerate(HOSTILE_NAMES):
        src = make_nfcapd_file(tmp_path / "src" / f"n{i}", 500 + i, seed=300 + i)
        shutil.copyfile(src, env.collector / name)
        good.append(src)
    # Broken files under collector names.
    (env.collector / "nfcapd.empty").write_bytes(b"")
    (env.collector / "nfcapd.random").write_bytes(os.urandom(50_000))
    whole = good[0].read_bytes()
    (env.collector / "nfcapd.truncated").write_bytes(whole[: len(whole) // 2])
    big = make_nfcapd_file(tmp_path / "src" / "big", 30_000, seed=5)
    assert big.stat().st_size > 2_000_000
    shutil.copyfile(big, env.collector / "nfcapd.too-big")
    # A symlink that leads out of the collector directory.
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = make_nfcapd_file(outside / "nfcapd.secret", 100, seed=9)
    os.symlink(secret, env.collector / "nfcapd.link-out")

    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "1", "--once",
                             "-c", str(env.config)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode != 0, "files were set aside: the run says so"
    master = env.log(f"{env.pipeline}-master.log")
    worker = env.log(f"{env.pipeline}-worker-0.log")

    # Every hostile name was ingested, and none was run by a shell.
    assert flow_table_rows(env.table()) == flow_reference_rows(good)
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*"))
    assert "nfcapd.$(touch PWNED)" in master and "-nfcapd.leading-dash" in master

    # Broken files: named, with the problem, and set aside with the reason.
    assert "rejected" in master and "nfcapd.empty: empty file" in master.replace(
        str(env.collector) + "/", "")
    assert "nfcapd.too-big" in master and "above max_file_size (2000000)" in master
    local_q = env.staging / "quarantine" / env.pipeline
    assert (local_q / "nfcapd.empty").exists() and (local_q / "nfcapd.too-big.reason.txt").exists()
    for name in ("nfcapd.random", "nfcapd.truncated"):
        assert f"quarantined {name}: nfdump could not read" in worker
    store_q = list((env.warehouse / "flow" / "quarantine").rglob("*.reason.txt"))
    reasons = " ".join(p.read_text() for p in store_q)
    assert len(store_q) == 2 and "nfcapd.random" in reasons and "nfcapd.truncated" in reasons

    # The symlink was not followed, and the log says so.
    assert "nfcapd.link-out is a symlink to" in master and "not followed" in master
    assert secret.exists() and (env.collector / "nfcapd.link-out").is_symlink()
