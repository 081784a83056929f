"""A freshly installed Debian 12 in a chroot, for the on-demand newcomer check.

``tests/test_fresh_system.py`` uses this to run the README's commands the way a
newcomer would: on a stock Debian 12 (python3, git and sudo; no pip, no venv),
in a clean clone, as root and as a normal user with sudo.

* The root is built once with ``debootstrap --variant=minbase`` and kept as a
  tarball (``$SPOT_FRESH_DIR``, default /var/tmp/spot-ingest-fresh); every run
  unpacks it into a new directory ``runs/<stamp>/root``, so each run starts from
  an untouched system.
* Into that root go the host's resolver, apt sources and pip settings (never a
  local wheel folder), and its CA bundle, so that apt and pip reach the same
  registries the host does; proc, sys, dev, dev/pts and a tmpfs on /tmp and
  /dev/shm are mounted.
* ``close()`` kills what still runs inside the root, unmounts everything (lazily
  if it must) and checks that nothing under the run directory is mounted any
  more. A run that was killed before it could do so is cleaned up by the next
  one (or by ``python3 tests/fresh_root.py cleanup``).

Commands run with ``env -i`` and a login shell, so nothing of the caller's
environment leaks in but the pip variables named in ``PIP_VARIABLES``.

Stand-alone use, for debugging the harness itself:
``python3 tests/fresh_root.py probe`` checks that apt and pip work inside the
root with the copied settings; ``python3 tests/fresh_root.py cleanup`` unmounts
what killed runs left behind.

Must run as root (debootstrap, chroot, mount).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("SPOT_FRESH_DIR", "/var/tmp/spot-ingest-fresh"))
SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("git", "python3", "sudo")
# Passed into the root (when set on the host). PIP_FIND_LINKS is not: a newcomer
# has no local wheel folder.
PIP_VARIABLES = ("PIP_DEFAULT_TIMEOUT", "PIP_CERT", "PIP_DISABLE_PIP_VERSION_CHECK")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER = "newcomer"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BUILD_TIMEOUT = 30 * 60


def _now() -> str:
    return time.strftime("%H:%M:%S")


class Transcript:
    """Everything a run did, in a log file; notes are also printed."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8", errors="replace")
        self._lock = threading.Lock()

    def note(self, text: str, echo: bool = True) -> None:
        with self._lock:
            self._file.write(text.rstrip("\n") + "\n")
            self._file.flush()
        if echo:
            print(text.rstrip("\n"), flush=True)

    def raw(self, line: str) -> None:
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class StepResult:
    name: str
    command: str
    user: str
    cwd: str
    timeout: float
    returncode: int | None = None   # None: killed at the timeout
    duration: float = 0.0
    output: str = ""
    leftovers: list = field(default_factory=list)  # processes still running in the root after it

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.rstrip("\n").splitlines()[-lines:])

    def last_line(self) -> str:
        lines = [l for l in self.output.splitlines() if l.strip()]
        return lines[-1].strip() if lines else ""

    def report(self, lines: int = 40) -> str:
        status = (f"TIMED OUT after {self.timeout:.0f} s" if self.timed_out
                  else f"exit {self.returncode}")
        text = [f"--- step: {self.name}",
                f"    as {self.user} in {self.cwd}: {self.command}",
                f"    {status}, {self.duration:.1f} s"]
        if self.leftovers:
            text.append("    still running in the root afterwards (killed): "
                        + "; ".join(f"{pid} {cmd}" for pid, cmd in self.leftovers))
        text.append(f"    last {lines} lines of output:")
        text += ["    | " + l for l in self.tail(lines).splitlines()] or ["    | (no output)"]
        return "\n".join(text)


# --------------------------------------------------------------------------- helpers

def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, as the kernel lists them."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def processes_in(root: Path) -> list[tuple[int, str]]:
    """Processes whose root directory is ``root`` or below it."""
    prefix = str(root).rstrip("/")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            proc_root = os.readlink(f"/proc/{entry}/root")
            if proc_root != prefix and not proc_root.startswith(prefix + "/"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue   # gone meanwhile, or a zombie
        found.append((int(entry), cmd[:200]))
    return found


def kill_processes_in(root: Path, timeout: float = 20) -> list[tuple[int, str]]:
    """SIGKILL every process running inside ``root``; wait until they are gone."""
    killed = []
    deadline = time.monotonic() + timeout
    while True:
        procs = processes_in(root)
        if not procs:
            return killed
        for pid, cmd in procs:
            if (pid, cmd) not in killed:
                killed.append((pid, cmd))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {root} survive SIGKILL: {procs}")
        time.sleep(0.1)   # polling for the exit of processes that are not our children


def unmount_all(path: Path, log=print) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; lazily if a plain
    unmount fails. Returns what is still mounted (nothing, normally)."""
    for _ in range(20):
        points = mounts_under(path)
        if not points:
            return []
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            r = subprocess.run(["umount", point], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"umount {point}: {r.stderr.strip()}; unmounting lazily")
                r = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
                if r.returncode != 0:
                    log(f"umount -l {point}: {r.stderr.strip()}")
    return mounts_under(path)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mounted file system."""
    if mounts_under(path):
        raise RuntimeError(f"refusing to remove {path}: something is mounted below it")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def cleanup_stale_runs(log=print) -> None:
    """Unmount and remove the roots of earlier runs that died before their own
    cleanup (their lock is free). A run in progress holds its lock and is left alone."""
    runs = CACHE / "runs"
    if not runs.is_dir():
        return
    for run_dir in sorted(runs.iterdir()):
        root = run_dir / "root"
        lock = run_dir / ".lock"
        if not root.exists() or not lock.exists():
            continue
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue   # a live run
            killed = kill_processes_in(root)
            if killed:
                log(f"stale run {run_dir.name}: killed {killed}")
            left = unmount_all(root, log)
            if left:
                raise RuntimeError(f"stale run {run_dir}: cannot unmount {left}")
            log(f"stale run {run_dir.name}: removing its root")
            remove_tree(root)


def _host_mirror() -> str | None:
    """The host's Debian mirror for SUITE (from the apt sources copied into the root)."""
    if os.environ.get("SPOT_FRESH_MIRROR"):
        return os.environ["SPOT_FRESH_MIRROR"]
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for stanza in re.split(r"\n\s*\n", deb822.read_text()):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []) \
                    and "main" in fields.get("components", []) and fields.get("uris"):
                return fields["uris"][0]
    listfile = Path("/etc/apt/sources.list")
    if listfile.exists():
        for line in listfile.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            words = [w for w in words if not w.startswith("[")]
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                return words[1]
    return None   # debootstrap's default


def _compressor() -> tuple[str, str]:
    if shutil.which("zstd"):
        return "zstd -T0 -3", ".tar.zst"
    return "gzip -1", ".tar.gz"


def ensure_pristine(log=print) -> tuple[Path, float, bool]:
    """The pristine root as a tarball: reused if a complete one exists, else built.
    Returns (tarball, seconds, reused)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    compress, suffix = _compressor()
    key = f"debian-{SUITE}-{VARIANT}-" + "-".join(PACKAGES)
    tarball = CACHE / (key + suffix)
    manifest = CACHE / (key + ".json")
    started = time.monotonic()
    with open(CACHE / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rebuild = os.environ.get("SPOT_FRESH_REBUILD") == "1"
        if tarball.exists() and manifest.exists() and not rebuild:
            info = json.loads(manifest.read_text())
            log(f"{_now()} reusing the pristine root {tarball} "
                f"(built {info.get('built')}, {tarball.stat().st_size >> 20} MiB)")
            return tarball, time.monotonic() - started, True
        for stale in CACHE.glob("build-*"):   # of builds killed midway (we hold the lock)
            unmount_all(stale, log)
            remove_tree(stale)
        build = CACHE / f"build-{os.getpid()}"
        mirror = _host_mirror()
        cmd = ["debootstrap", f"--variant={VARIANT}", "--include=" + ",".join(PACKAGES),
               SUITE, str(build)] + ([mirror] if mirror else [])
        log(f"{_now()} building the pristine root: {shlex.join(cmd)}")
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=BUILD_TIMEOUT)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap failed (exit {r.returncode}):\n"
                                   + "\n".join((r.stdout + r.stderr).splitlines()[-40:]))
            subprocess.run(["chroot", str(build), "apt-get", "clean"], check=True,
                           capture_output=True)
            versions = {}
            for name, probe in (("python3", ["python3", "--version"]),
                                ("git", ["git", "--version"]),
                                ("sudo", ["sudo", "--version"])):
                p = subprocess.run(["chroot", str(build)] + probe, capture_output=True, text=True,
                                   env={"PATH": ROOT_PATH})
                if p.returncode != 0:
                    raise RuntimeError(f"pristine root: {name} does not run: {p.stderr}")
                versions[name] = (p.stdout + p.stderr).splitlines()[0]
            p = subprocess.run(["chroot", str(build), "python3", "-m", "pip", "--version"],
                               capture_output=True, text=True, env={"PATH": ROOT_PATH})
            if p.returncode == 0:
                raise RuntimeError(f"pristine root is not stock: it has pip ({p.stdout.strip()})")
            partial = CACHE / (key + suffix + ".partial")
            subprocess.run(["tar", "--numeric-owner", "-I", compress, "-cf", str(partial),
                            "-C", str(build), "."], check=True)
            manifest.write_text(json.dumps({
                "suite": SUITE, "variant": VARIANT, "packages": PACKAGES, "mirror": mirror,
                "built": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions}, indent=1))
            os.replace(partial, tarball)   # complete only once renamed into place
        finally:
            if build.exists():
                unmount_all(build, log)
                remove_tree(build)
        log(f"{_now()} pristine root ready: {tarball} ({tarball.stat().st_size >> 20} MiB, "
            f"{time.monotonic() - started:.0f} s)")
        return tarball, time.monotonic() - started, False


# --------------------------------------------------------------------------- the root

class FreshRoot:
    """One run's root: unpacked from the pristine tarball, configured, mounted."""

    def __init__(self, transcript: Transcript | None = None, run_dir: Path | None = None):
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.run_dir = run_dir or CACHE / "runs" / stamp
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.run_dir / ".lock", "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.root = self.run_dir / "root"
        self.log = transcript or Transcript(self.run_dir / "transcript.log")
        self.phases: dict[str, float] = {}
        self.mounted: list[str] = []
        self.commit = ""

    # -- phases

    def _phase(self, name: str, started: float) -> None:
        self.phases[name] = time.monotonic() - started

    def create(self, source: str, pristine: Path) -> "FreshRoot":
        t = time.monotonic()
        self.root.mkdir()
        compress, _ = _compressor()
        subprocess.run(["tar", "--numeric-owner", "-I", compress.split()[0], "-xpf",
                        str(pristine), "-C", str(self.root)], check=True)
        self._phase("unpack", t)
        t = time.monotonic()
        self.configure()
        self.mount()
        self.add_user()
        self._phase("configure, mount, user", t)
        t = time.monotonic()
        self.clone(source)
        self._phase("clones", t)
        return self

    def configure(self) -> None:
        etc = self.root / "etc"
        # Resolver and host name: what the machine's installer would have written.
        for name in ("resolv.conf", "hosts", "hostname"):
            target = etc / name
            if target.is_symlink() or target.exists():
                target.unlink()
            if Path("/etc", name).exists():
                target.write_bytes(Path("/etc", name).read_bytes())
        # apt: the host's Debian sources, nothing else (no third-party lists).
        host_sources = [n for n in ("sources.list", "sources.list.d/debian.sources")
                        if Path("/etc/apt", n).is_file()]
        if host_sources:
            for n in ("sources.list", "sources.list.d/debian.sources"):
                target = etc / "apt" / n
                if target.exists():
                    target.unlink()
            for n in host_sources:
                target = etc / "apt" / n
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path("/etc/apt", n), target)
        # pip's settings (pip itself is not there: setup has to bring it).
        if Path("/etc/pip.conf").is_file():
            shutil.copy2("/etc/pip.conf", etc / "pip.conf")
        if Path("/etc/xdg/pip").is_dir():
            shutil.copytree("/etc/xdg/pip", etc / "xdg" / "pip", dirs_exist_ok=True)
        # The host's CA bundle (pip's PIP_CERT points at it), and the local CAs it was
        # made from, so that a later update-ca-certificates in the root keeps them.
        bundle = self.root / CA_BUNDLE.lstrip("/")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes(Path(CA_BUNDLE).read_bytes())
        local_cas = Path("/usr/local/share/ca-certificates")
        if local_cas.is_dir():
            shutil.copytree(local_cas, self.root / "usr/local/share/ca-certificates",
                            dirs_exist_ok=True)
        self.log.note(f"{_now()} root configured: resolver, apt sources {host_sources}, "
                      f"pip settings, CA bundle")

    def _mount(self, args: list[str], target: str) -> None:
        point = self.root / target
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(point)], check=True, capture_output=True, text=True)
        self.mounted.append(str(point))
        # Nothing mounted inside may propagate back to the host (e.g. onto its /dev/shm).
        r = subprocess.run(["mount", "--make-private", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mount --make-private {point}: {r.stderr.strip()}")

    def mount(self) -> None:
        try:
            self._mount(["-t", "proc", "proc"], "proc")
            self._mount(["-t", "sysfs", "sysfs"], "sys")
            self._mount(["--bind", "/dev"], "dev")
            self._mount(["--bind", "/dev/pts"], "dev/pts")
            self._mount(["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs"], "dev/shm")
            self._mount(["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs"], "tmp")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{shlex.join(e.cmd)}: {e.stderr.strip()}") from None
        self.log.note(f"{_now()} mounted: " + ", ".join(
            p[len(str(self.root)):] for p in mounts_under(self.root)))

    def add_user(self) -> None:
        subprocess.run(["chroot", str(self.root), "useradd", "--create-home", "--shell",
                        "/bin/bash", USER], check=True, capture_output=True,
                       env={"PATH": ROOT_PATH})
        sudoers = self.root / "etc/sudoers.d" / USER
        sudoers.write_text(f"{USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        r = subprocess.run(["chroot", str(self.root), "visudo", "-c"], capture_output=True,
                           text=True, env={"PATH": ROOT_PATH})
        if r.returncode != 0:
            raise RuntimeError(f"visudo -c in the root: {r.stdout}{r.stderr}")
        self.log.note(f"{_now()} user {USER} created, passwordless sudo in /etc/sudoers.d/{USER}")

    def user_ids(self, user: str) -> tuple[int, int]:
        for line in (self.root / "etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == user:
                return int(parts[2]), int(parts[3])
        raise KeyError(user)

    def clone(self, source: str) -> None:
        for user, home in (("root", "root"), (USER, f"home/{USER}")):
            target = self.root / home / "spot-ingest"
            r = subprocess.run(["git", "clone", "--no-hardlinks", "--quiet", source, str(target)],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise RuntimeError(f"git clone {source}: {r.stderr.strip()}")
            if user != "root":
                uid, gid = self.user_ids(user)
                subprocess.run(["chown", "-R", "--no-dereference", f"{uid}:{gid}", str(target)],
                               check=True)
        self.commit = subprocess.run(
            ["git", "-C", str(self.root / "root/spot-ingest"), "log", "-1", "--format=%h %s"],
            capture_output=True, text=True, check=True).stdout.strip()
        self.log.note(f"{_now()} cloned {source} into /root/spot-ingest and "
                      f"/home/{USER}/spot-ingest: {self.commit}")

    # -- commands

    def home(self, user: str) -> str:
        return "/root" if user == "root" else f"/home/{user}"

    def command_argv(self, command: str, user: str = "root", cwd: str | None = None) -> list[str]:
        home = self.home(user)
        cwd = cwd or home
        env = {"PATH": ROOT_PATH, "HOME": home, "LANG": "C.UTF-8", "USER": user,
               "LOGNAME": user, "SHELL": "/bin/bash"}
        env.update({k: os.environ[k] for k in PIP_VARIABLES if k in os.environ})
        inner = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
                 "/bin/bash", "-lc", f"cd {shlex.quote(cwd)} && {command}"]
        if user != "root":
            inner = ["/usr/sbin/runuser", "-u", user, "--"] + inner
        return ["chroot", str(self.root)] + inner

    def run(self, name: str, command: str, user: str = "root", cwd: str | None = None,
            timeout: float = 600) -> StepResult:
        """Run ``command`` with bash -lc inside the root; output into the transcript."""
        result = StepResult(name, command, user, cwd or self.home(user), timeout)
        self.log.note(f"{_now()} >>> {name}: as {user} in {result.cwd}: {command} "
                      f"(timeout {timeout:.0f} s)")
        chunks: list[str] = []
        started = time.monotonic()
        proc = subprocess.Popen(self.command_argv(command, user, cwd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def pump() -> None:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                chunks.append(line)
                self.log.raw("    | " + line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            result.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed = kill_processes_in(self.root)   # and daemons that left the group
            proc.wait()
            result.returncode = None
        else:
            # A step that left something running would change what the next one sees.
            killed = kill_processes_in(self.root)
        result.duration = time.monotonic() - started
        result.leftovers = killed
        reader.join(timeout=30)
        result.output = "".join(chunks)
        self.log.note(result.report())
        return result

    # -- the end

    def close(self, keep: bool = False) -> list[str]:
        """Kill what runs in the root, unmount everything; return what is still mounted
        under the run directory (must be nothing). Removes the root unless ``keep``."""
        t = time.monotonic()
        try:
            killed = kill_processes_in(self.root)
            if killed:
                self.log.note(f"{_now()} killed, still running in the root: {killed}")
        finally:
            left = unmount_all(self.root, self.log.note)
        if left:
            self.log.note(f"{_now()} STILL MOUNTED: {left}")
        elif not keep:
            remove_tree(self.root)
        self._phase("cleanup", t)
        self.log.note(f"{_now()} cleanup done ({self.phases['cleanup']:.1f} s): "
                      f"{'nothing left mounted' if not left else 'MOUNTS LEFT'}"
                      f"{'; root kept at ' + str(self.root) if keep and not left else ''}")
        self._lock.close()
        return left


# --------------------------------------------------------------------------- debugging

def _probe() -> int:
    """Check the mechanics: apt and pip inside the root with the copied settings,
    commands as root and as the normal user, the timeout, and the cleanup."""
    source = os.environ.get("SPOT_FRESH_SOURCE", str(Path(__file__).resolve().parent.parent))
    cleanup_stale_runs()
    tarball, seconds, reused = ensure_pristine()
    fresh = FreshRoot()
    print(f"transcript: {fresh.log.path}")
    failures = []
    try:
        fresh.create(source, tarball)
        checks = [
            ("identity", "root", "id; echo PATH=$PATH; env | grep ^PIP_ | sort; "
             "test -z \"${PIP_FIND_LINKS:-}\"; ! test -e /opt/wheels", 60),
            ("newcomer identity and sudo", USER, "id; echo PATH=$PATH; pwd; "
             "sudo -n true && echo sudo ok; touch spot-ingest/x && rm spot-ingest/x", 60),
            ("stock: no pip", "root", "! python3 -m pip --version", 60),
            ("mounts", "root", "stat -c '%a %n' /tmp /dev/shm; ls /dev/pts | head -3; "
             "test -e /proc/self/status && test -d /sys/class", 60),
            ("timeout", "root", "echo start; sleep 600", 5),
            ("apt-get update", "root", "apt-get update", 600),
            ("pip for the probe", "root",
             "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
             "python3-pip >/dev/null && python3 -m pip --version", 900),
            ("pip download", "root", "python3 -m pip download --no-deps -d /tmp/x six && ls /tmp/x",
             600),
        ]
        for name, user, cmd, timeout in checks:
            r = fresh.run(name, cmd, user=user, timeout=timeout)
            ok = r.timed_out if name == "timeout" else r.returncode == 0
            if not ok:
                failures.append(name)
    finally:
        left = fresh.close(keep=os.environ.get("SPOT_FRESH_KEEP") == "1")
    print(f"phases: {fresh.phases}; pristine root {'reused' if reused else 'built'} "
          f"in {seconds:.0f} s")
    print(f"failed checks: {failures or 'none'}; left mounted: {left or 'nothing'}")
    return 1 if failures or left else 0


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "probe":
        sys.exit(_probe())
    if what == "cleanup":
        cleanup_stale_runs()
        sys.exit(0)
    print("usage: python3 tests/fresh_root.py probe|cleanup", file=sys.stderr)
    sys.exit(2)
