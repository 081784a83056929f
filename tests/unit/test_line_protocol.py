"""The line protocol's master side, the Spark Kafka source's options, the
backoff and the pipeline registry: in-process, no broker, no Spark, no tool."""
from __future__ import annotations

import re

import pytest

from spot_ingest import lines
from spot_ingest import pipeline as registry
from spot_ingest.config import KafkaConfig
from spot_ingest.pipelines.proxy import PROXY
from spot_ingest.pipelines.proxy.sample import write_log
from spot_ingest.policy import Backoff, RetryLater
from spot_ingest.streaming import StreamConfigError, spark_kafka_options


def test_messages_hold_whole_lines_within_the_size_and_are_cut_the_same_twice(tmp_path):
    log = write_log(tmp_path / "a.log", 800, seed=5)
    first = list(lines.cut(log, "a.log", 30_000, PROXY))
    again = list(lines.cut(log, "a.log", 30_000, PROXY))
    assert first == again and len(first) > 3
    data = [line for line in log.read_bytes().split(b"\n") if line and not line.startswith(b"#")]
    assert b"\n".join(m.value for m in first) == b"\n".join(data), "every data line, in order"
    for m in first:
        headers = dict(m.headers)
        assert len(m.value) + sum(len(k) + len(v) for k, v in m.headers) <= 30_000
        assert re.fullmatch(lines.MESSAGE_ID_PATTERN, headers[lines.ID].decode())
        assert headers[lines.KIND] == b"LINES" and headers[lines.SOURCE] == b"a.log"


def test_a_grown_log_publishes_only_its_new_lines(tmp_path):
    log = write_log(tmp_path / "g.log", 300, seed=6)
    state = tmp_path / "ledger"
    before = list(lines.cut(log, "g.log", 900_000, PROXY, state_dir=state))
    with open(log, "ab") as f:
        f.write(b"\n".join(write_log(tmp_path / "more.log", 50, seed=7).read_bytes()
                           .split(b"\n")[-51:]))
    after = list(lines.cut(log, "g.log", 900_000, PROXY, state_dir=state))
    assert len(before) == 1 and len(after) == 1
    assert dict(after[0].headers)[lines.FIRST_LINE] != dict(before[0].headers)[lines.FIRST_LINE]
    assert after[0].value.count(b"\n") + 1 == 50


def test_end_of_run_marker_and_output_names():
    marker = lines.end_of_run("0a1b2c3d")
    assert dict(marker.headers) == {lines.KIND: b"END_OF_RUN", lines.RUN: b"0a1b2c3d"}
    a = lines.output_name(b"x", [(lines.ID, b"1")])
    assert a != lines.output_name(b"x", [(lines.ID, b"2")])
    assert a != lines.output_name(b"x1", [(lines.ID, b"")]), "no shift between value and headers"


@pytest.mark.parametrize("body, problem", [
    (b" date time c-ip", None),
    (b" date date", "the #Fields: header names date more than once"),
    (b" ", "the #Fields: header names no field"),
    (b" date\x00time", "the #Fields: header holds a control character (e.g. a NUL byte)"),
])
def test_fields_headers_are_checked(body, problem):
    assert PROXY.fields_header(b"#Fields:" + body)[1] == problem
    assert PROXY.fields_header(b"#Software: SGOS 6.7") is None


def test_spark_kafka_options_carry_the_same_settings(tmp_path):
    plain = spark_kafka_options(KafkaConfig("k1,k2:9093", 9092), "t")
    assert plain["kafka.bootstrap.servers"] == "k1:9092,k2:9093"
    assert plain["subscribe"] == "t" and plain["includeHeaders"] == "true"
    assert plain["kafka.security.protocol"] == "PLAINTEXT"
    secret = tmp_path / "pw"
    secret.write_text('s3"cret\n')
    ca = tmp_path / "ca.pem"
    sasl = spark_kafka_options(KafkaConfig("k", 9093, security_protocol="SASL_SSL", ssl_cafile=ca,
                                           sasl_mechanism="SCRAM-SHA-512", sasl_username="spot",
                                           sasl_password_file=secret), "t")
    assert sasl["kafka.ssl.truststore.type"] == "PEM"
    assert sasl["kafka.ssl.truststore.location"] == str(ca)
    assert sasl["kafka.sasl.mechanism"] == "SCRAM-SHA-512"
    assert sasl["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="spot" '
        'password="s3\\"cret";')
    with pytest.raises(StreamConfigError, match="must be one PEM file"):
        spark_kafka_options(KafkaConfig("k", 9093, security_protocol="SSL",
                                        ssl_certfile=tmp_path / "c.pem",
                                        ssl_keyfile=tmp_path / "k.pem"), "t")


def test_backoff_doubles_up_to_its_limit_and_honours_advice():
    b = Backoff(first=2.0, most=60.0)
    assert [b.delay() for _ in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    b.reset()
    assert b.delay(retry_after=30) == 30 and b.attempts == 1


def test_registry_knows_each_folder_and_refuses_a_bare_pipeline(monkeypatch):
    assert {"flow", "dns", "proxy"} <= set(registry.known_types())
    assert isinstance(registry.load("proxy"), registry.RecordPipeline)
    assert isinstance(registry.load("flow"), registry.FilePipeline)
    with pytest.raises(TypeError):
        registry.RecordPipeline()      # parse is abstract: a record pipeline must give it
    with pytest.raises(KeyError, match="unknown pipeline type 'nosuch'"):
        registry.load("nosuch")


def test_an_unreachable_store_is_retried_no_sooner_than_it_advises(tmp_path):
    from spot_ingest.store import LocalStore, StoreUnavailable
    with pytest.raises(StoreUnavailable) as refused:
        LocalStore(str(tmp_path / "not-mounted")).check_reachable()
    assert isinstance(refused.value, RetryLater)
    assert Backoff(first=2.0, most=60.0).delay(refused.value.retry_after) == 10.0
