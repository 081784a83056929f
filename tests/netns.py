"""Hosts for multi-host tests and benchmarks: Linux network namespaces on one
machine, each with its own network stack and one interface (``eth0``) on a
switch (a bridge in a namespace of its own, so nothing touches the machine's
own network), with addresses from 198.18.0.0/15 (reserved for benchmarking,
RFC 2544). They share the file system, as hosts share an NFS mount.

    with Lan(["broker", "master", "worker0", "worker1"]) as lan:
        lan.popen("worker0", ["python", "-m", ...])
        lan.cut("worker1"); lan.restore("worker1")

Needs root and ``ip`` (iproute2). Everything made is removed on exit,
processes first.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import uuid
from pathlib import Path


def _kill_group(pgid: int) -> None:
    """SIGKILL a process group but multiprocessing's resource tracker, which
    removes the semaphores of the processes killed once they are gone."""
    import psutil
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and not any(
                    "resource_tracker" in part for part in proc.cmdline()):
                proc.kill()
        except (psutil.Error, ProcessLookupError):
            continue


def ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=30)


class Lan:
    def __init__(self, hosts: list[str]):
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = random.randrange(0, 512)     # a /24 of 198.18.0.0/15
        self.switch = f"spot-{self.tag}-sw"
        self.hosts = {h: f"spot-{self.tag}-{h}" for h in hosts}
        self.addresses = {h: f"198.{18 + self.subnet // 256}.{self.subnet % 256}.{i + 1}"
                          for i, h in enumerate(hosts)}
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Lan":
        try:
            ip("netns", "add", self.switch)
            ip("link", "add", "br0", "type", "bridge", netns=self.switch)
            ip("link", "set", "br0", "up", netns=self.switch)
            for i, (host, ns) in enumerate(self.hosts.items()):
                ip("netns", "add", ns)
                ip("link", "set", "lo", "up", netns=ns)
                port = f"p{i}"
                ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                   netns=self.switch)
                ip("link", "set", port, "master", "br0", netns=self.switch)
                ip("link", "set", port, "up", netns=self.switch)
                ip("addr", "add", f"{self.addresses[host]}/24", "dev", "eth0", netns=ns)
                ip("link", "set", "eth0", "up", netns=ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def popen(self, host: str, argv: list[str], log: Path | None = None, cpus: str | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host`` (pinned to ``cpus`` with taskset if given)."""
        pin = ["taskset", "-c", cpus] if cpus else []
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([*pin, "ip", "netns", "exec", self.hosts[host], *argv],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    **kwargs)
        finally:
            if log:
                out.close()
        proc.host, proc.log_path = host, log
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts[host], *argv], **kwargs)

    def cut(self, host: str) -> None:
        """The host's link goes down (its cable pulled)."""
        ip("link", "set", "eth0", "down", netns=self.hosts[host])

    def restore(self, host: str) -> None:
        ip("link", "set", "eth0", "up", netns=self.hosts[host])

    def stop(self, proc: subprocess.Popen, timeout: float = 30) -> None:
        """SIGTERM to the process group, then SIGKILL (see ``_kill_group``)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        _kill_group(proc.pid)
        proc.wait()

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            self.stop(proc)
        for ns in [*self.hosts.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
