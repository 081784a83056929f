"""What a newcomer sees on a freshly installed Debian 12 (on demand, not in CI).

A stock Debian 12 root (debootstrap minbase + git, python3, sudo: no pip, no venv)
gets a clean clone of this repository, and the README's commands run in a chroot,
as root and as a normal user with passwordless sudo. Mechanics: tests/fresh_root.py.

    .venv/bin/python -m pytest -m fresh_system tests/test_fresh_system.py -s

(as root). tests/conftest.py imports the project's dependencies; with a Python
that lacks them add ``--noconftest``: this module needs only pytest.
Needs root on the host (debootstrap, chroot, mount) and network access to the
host's Debian mirror and Python package index; the first run builds the root
(about a minute), later runs reuse it. Settings, by environment variable:
SPOT_FRESH_SOURCE  what to clone (default: this repository; its committed HEAD)
SPOT_FRESH_DIR     cache and run directories (default /var/tmp/spot-ingest-fresh)
SPOT_FRESH_KEEP=1  keep the run's root for inspection (unmounted)
SPOT_FRESH_REBUILD=1  debootstrap anew instead of reusing the pristine tarball

The steps are separate tests, in README order; one that needs an earlier step
which failed fails too, saying so. Each step prints its command, duration, exit
code and output tail; the full transcript is in runs/<stamp>/transcript.log.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fresh_root  # noqa: E402

pytestmark = pytest.mark.fresh_system

SOURCE = os.environ.get("SPOT_FRESH_SOURCE", str(Path(__file__).resolve().parent.parent))
ROOT_CLONE = "/root/spot-ingest"
USER_CLONE = f"/home/{fresh_root.USER}/spot-ingest"
MINUTE = 60
SETUP_TIMEOUT = 30 * MINUTE     # installs Java, nfdump, tshark, PySpark
DEMO_TIMEOUT = 15 * MINUTE
SUITE_TIMEOUT = 30 * MINUTE     # the test suite, on top of its setup
NOOP_SETUP_SECONDS = 30

FLOW_DEMO = "./start_standalone_ingest.sh flow_internals 2 --demo"
FLOW_ROWS = "flow table: 20000 rows"


class Run:
    """The fresh root of this module's run, and which steps have passed."""

    def __init__(self, root: fresh_root.FreshRoot):
        self.root = root
        self.passed: set[str] = set()

    def step(self, name: str, command: str, *, user: str = "root", cwd: str = ROOT_CLONE,
             timeout: float, needs: str | None = None) -> fresh_root.StepResult:
        if needs is not None and needs not in self.passed:
            pytest.fail(f"step {name!r} not run: it needs step {needs!r}, which failed",
                        pytrace=False)
        return self.root.run(name, command, user=user, cwd=cwd, timeout=timeout)


def check(result: fresh_root.StepResult, ok: bool, expectation: str) -> None:
    """Fail with the step's name, command, exit code and output tail unless ``ok``."""
    if not ok:
        pytest.fail(f"step {result.name!r} failed: expected {expectation}\n"
                    f"{result.report(lines=60)}", pytrace=False)


def check_exit_0(result: fresh_root.StepResult) -> None:
    check(result, result.returncode == 0, "exit 0")


def _fresh_run():
    if os.geteuid() != 0:
        pytest.fail("the fresh-system check needs root (debootstrap, chroot, mount)",
                    pytrace=False)
    fresh_root.cleanup_stale_runs()
    root = fresh_root.FreshRoot()
    log = root.log
    log.note(f"transcript: {log.path}")
    try:
        tarball, seconds, reused = fresh_root.ensure_pristine(log.note)
        root.phases["pristine root (" + ("reused" if reused else "debootstrap") + ")"] = seconds
        root.create(SOURCE, tarball)
        # Nothing beside the clone: the suite must read nothing from outside the repository.
        assert not (root.root / "root" / "shared").exists()
        yield Run(root)
    finally:
        left = root.close(keep=os.environ.get("SPOT_FRESH_KEEP") == "1")
        log.note("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in root.phases.items()))
        log.note(f"transcript: {log.path}")
        log.close()
    assert not left, f"still mounted after the run: {left}"
    assert not fresh_root.mounts_under(root.run_dir)


@pytest.fixture(scope="module")
def run():
    yield from _fresh_run()


@pytest.fixture(scope="module")
def newcomer_run():
    """A root of its own, so that the newcomer's setup installs the system
    packages itself, through sudo."""
    yield from _fresh_run()


def test_root_setup_and_flow_demo(run):
    name = "root: setup + flow demo"
    r = run.step(name, f"scripts/setup.sh && {FLOW_DEMO}",
                 timeout=SETUP_TIMEOUT + DEMO_TIMEOUT)
    check_exit_0(r)
    check(r, FLOW_ROWS in r.output, repr(FLOW_ROWS) + " in the output")
    run.passed.add(name)


def test_root_dns_demo(run):
    r = run.step("root: dns demo", "./start_standalone_ingest.sh dns_server_1 2 --demo",
                 timeout=DEMO_TIMEOUT, needs="root: setup + flow demo")
    check_exit_0(r)
    m = re.search(r"dns table: (\d+) rows", r.output)
    check(r, m is not None, "'dns table: N rows' in the output")
    check(r, int(m.group(1)) > 0, f"a positive dns row count (2000 if every answer came), "
                                  f"got {m.group(1)}")


def test_root_proxy_demo(run):
    r = run.step("root: proxy demo", "./start_standalone_ingest.sh proxy_1 2 --demo",
                 timeout=DEMO_TIMEOUT, needs="root: setup + flow demo")
    check_exit_0(r)
    check(r, "proxy table: 5000 rows" in r.output, "'proxy table: 5000 rows' in the output")


def test_root_flow_demo_again(run):
    r = run.step("root: flow demo again", FLOW_DEMO, timeout=DEMO_TIMEOUT,
                 needs="root: setup + flow demo")
    check_exit_0(r)
    check(r, FLOW_ROWS in r.output,
          repr(FLOW_ROWS) + " in the output again (a demo starts from a clean slate)")


def test_root_setup_again_has_nothing_to_do(run):
    r = run.step("root: setup again", "scripts/setup.sh", timeout=SETUP_TIMEOUT,
                 needs="root: setup + flow demo")
    check_exit_0(r)
    check(r, r.duration < NOOP_SETUP_SECONDS,
          f"a second setup under {NOOP_SETUP_SECONDS} s, took {r.duration:.1f} s")
    check(r, "nothing to do" in r.output.lower(), "'nothing to do' in the output")


def test_newcomer_setup_and_flow_demo(newcomer_run):
    r = newcomer_run.step(f"{fresh_root.USER}: setup + flow demo", f"scripts/setup.sh && {FLOW_DEMO}",
                 user=fresh_root.USER, cwd=USER_CLONE, timeout=SETUP_TIMEOUT + DEMO_TIMEOUT)
    check_exit_0(r)
    check(r, FLOW_ROWS in r.output, repr(FLOW_ROWS) + " in the output")
    check(r, "installing with apt-get" in r.output, "the newcomer's setup to install through sudo")
    newcomer_run.passed.add(r.name)


def test_newcomer_dns_demo(newcomer_run):
    r = newcomer_run.step(f"{fresh_root.USER}: dns demo",
                          "./start_standalone_ingest.sh dns_server_1 2 --demo",
                          user=fresh_root.USER, cwd=USER_CLONE, timeout=DEMO_TIMEOUT,
                          needs=f"{fresh_root.USER}: setup + flow demo")
    check_exit_0(r)
    check(r, "dns table: 2000 rows" in r.output, "'dns table: 2000 rows' (no capture privilege "
                                                  "needed)")


def test_root_test_suite(run):
    r = run.step("root: setup --test + test suite",
                 "scripts/setup.sh --test && .venv/bin/python -m pytest -p no:cacheprovider",
                 timeout=SETUP_TIMEOUT + SUITE_TIMEOUT)
    check_exit_0(r)
    last = r.last_line()
    check(r, re.search(r"\b\d+ passed\b", last) is not None
          and re.search(r"\b(failed|errors?)\b", last) is None,
          f"a last line saying passed, with no failed/error; got {last!r}")
