"""ingest_conf.json: the original format loads; each mistake gets one clear message."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spot_ingest.config import ConfigError, KafkaConfig, load

REPO = Path(__file__).resolve().parent.parent


def original_file(tmp_path: Path) -> dict:
    """A configuration as written for Apache Spot's ingest (its README's example)."""
    collector = tmp_path / "flow_collector"
    collector.mkdir(exist_ok=True)
    return {
        "dbname": "spotdb",
        "hdfs_app_path": str(tmp_path / "spot"),
        "collector_processes": 5,
        "ingestion_interval": 1,
        "spark-streaming": {"driver_memory": "", "spark_exec": "", "spark_executor_memory": "",
                            "spark_executor_cores": "", "spark_batch_size": ""},
        "kafka": {"kafka_server": "kafka.example", "kafka_port": "9092",
                  "zookeper_server": "zk.example", "zookeper_port": "2181",
                  "message_size": 900000},
        "pipelines": {
            "flow_internals": {"type": "flow", "collector_path": str(collector),
                               "local_staging": "/tmp/", "process_opt": ""},
            "dns_server_1": {
                "type": "dns", "collector_path": "/path_to_dns_collector",
                "local_staging": "/tmp/", "pkt_num": "650000", "pcap_split_staging": "/tmp",
                "process_opt": "-E separator=, -E header=y -E occurrence=f -T fields -e frame.time "
                               "-e frame.time_epoch -e frame.len -e ip.src -e ip.dst -e dns.resp.name "
                               "-e dns.resp.type -e dns.resp.class -e dns.flags.rcode -e dns.a "
                               "'dns.flags.response == 1'"},
        },
    }


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "ingest_conf.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_original_file_loads(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = load(write(tmp_path, original_file(tmp_path)))
    assert cfg.kafka.bootstrap == "kafka.example:9092"
    assert cfg.collector_processes == 5
    flow = cfg.pipeline("flow_internals")
    assert flow.type == "flow" and flow.supported_files == ("nfcapd.*",)
    assert flow.topic == "SPOT-INGEST-flow_internals"
    assert "zookeper_server is ignored" in caplog.text


def test_repository_default_config_loads():
    cfg = load(REPO / "ingest_conf.json")
    assert cfg.kafka.embedded_broker
    assert cfg.pipeline("flow_internals").collector_path.is_relative_to(REPO)


def expect_error(tmp_path, data, *fragments):
    with pytest.raises(ConfigError) as info:
        cfg = load(write(tmp_path, data))
        cfg.pipeline("flow_internals")
        cfg.check_collector_path("flow_internals")
    message = str(info.value)
    assert str(tmp_path / "ingest_conf.json") in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_pipeline_lists_known_ones(tmp_path):
    cfg = load(write(tmp_path, original_file(tmp_path)))
    with pytest.raises(ConfigError, match=r"unknown pipeline 'flow_x'.*dns_server_1, flow_internals"):
        cfg.pipeline("flow_x")


def test_missing_key(tmp_path):
    data = original_file(tmp_path)
    del data["kafka"]["kafka_server"]
    expect_error(tmp_path, data, "kafka.kafka_server", "missing key")


def test_missing_pipeline_key(tmp_path):
    data = original_file(tmp_path)
    del data["pipelines"]["flow_internals"]["collector_path"]
    expect_error(tmp_path, data, "pipelines.flow_internals.collector_path", "missing key")


def test_wrong_type(tmp_path):
    data = original_file(tmp_path)
    data["collector_processes"] = "five"
    expect_error(tmp_path, data, "collector_processes", "expected a positive whole number", '"five"')


def test_unknown_pipeline_type(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["type"] = "netflow"
    expect_error(tmp_path, data, "pipelines.flow_internals.type", "unknown pipeline type 'netflow'",
                 "known types: dns, flow, proxy")


def test_collector_path_that_does_not_exist(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["collector_path"] = str(tmp_path / "nope")
    expect_error(tmp_path, data, "pipelines.flow_internals.collector_path", "does not exist",
                 str(tmp_path / "nope"))


def test_hdfs_uri_without_an_hdfs_section_says_what_to_add(tmp_path):
    data = original_file(tmp_path)
    data["hdfs_app_path"] = "hdfs://namenode:8020/user/spot"
    expect_error(tmp_path, data, "hdfs_app_path", "no \"hdfs\" section", "Running on Hadoop")


def test_hdfs_home_without_an_hdfs_section_is_not_written_locally(tmp_path):
    data = original_file(tmp_path)
    data["hdfs_app_path"] = "/user/spot-test-absent"
    expect_error(tmp_path, data, "hdfs_app_path", "looks like an HDFS home directory",
                 "no such local directory")
    assert not Path("/user/spot-test-absent").exists()


def test_hdfs_section_makes_hdfs_app_path_an_hdfs_path(tmp_path):
    data = original_file(tmp_path)
    data["hdfs_app_path"] = "/user/spot"
    data["hdfs"] = {"url": ["http://nn1:9870", "http://nn2:9870/"], "user": "spot",
                    "timeout": "30", "scratch_dir": "scratch"}
    cfg = load(write(tmp_path, data))
    assert cfg.hdfs_app_path == "/user/spot"
    assert cfg.hdfs.url == "http://nn1:9870;http://nn2:9870"
    assert cfg.hdfs.timeout == 30.0 and cfg.hdfs.user == "spot"
    assert cfg.hdfs.scratch_dir == tmp_path / "scratch"
    assert str(cfg.store) == "http://nn1:9870;http://nn2:9870 /user/spot"
    data["hdfs_app_path"] = "hdfs://namenode:8020/user/spot/"
    assert load(write(tmp_path, data)).hdfs_app_path == "/user/spot"
    data["hdfs_app_path"] = "spot"
    data["hdfs"]["root"] = "/user"
    assert load(write(tmp_path, data)).hdfs_app_path == "/user/spot"


@pytest.mark.parametrize("hdfs, key, fragment", [
    ({"url": "namenode:9870"}, "hdfs.url", "is not http(s)://host:port"),
    ({"url": "http://nn:9870/webhdfs/v1"}, "hdfs.url", "without a path"),
    ({"url": 9870}, "hdfs.url", "expected the WebHDFS URL"),
    ({"url": "http://nn:9870", "tiemout": 3}, "hdfs.tiemout", "unknown key"),
    ({"url": "http://nn:9870", "timeout": 0}, "hdfs.timeout", "a positive number"),
    ({"url": "http://nn:9870", "verify": "/absent/ca.pem"}, "hdfs.verify", "not a readable file"),
    ({"url": "http://nn:9870", "verify": 1}, "hdfs.verify", "true, false or a CA bundle"),
    ({"url": "http://nn:9870", "root": "user"}, "hdfs.root", "not an absolute HDFS path"),
    ({"url": "http://nn:9870", "kerberos": {"principal": "spot", "keytab": "k"}},
     "hdfs.kerberos.principal", "spot@EXAMPLE.COM"),
    ({"url": "http://nn:9870", "kerberos": {"principal": "spot@R", "keytab": "/absent.keytab"}},
     "hdfs.kerberos.keytab", "not a readable file"),
    ({"url": "http://nn:9870", "kerberos": {"principal": "spot@R", "keytab": "/etc/hostname",
                                            "mutual_auth": "maybe"}},
     "hdfs.kerberos.mutual_auth", "not one of REQUIRED"),
    ({"url": "http://nn:9870", "user": "spot",
      "kerberos": {"principal": "spot@R", "keytab": "/etc/hostname"}}, "hdfs.user", "not both"),
])
def test_hdfs_section_mistakes_are_one_line_each(tmp_path, hdfs, key, fragment):
    data = original_file(tmp_path)
    data["hdfs"] = hdfs
    message = expect_error(tmp_path, data, key, fragment)
    assert "\n" not in message


def test_hdfs_app_path_with_dot_dot_is_refused(tmp_path):
    data = original_file(tmp_path)
    data["hdfs"] = {"url": "http://nn:9870"}
    data["hdfs_app_path"] = "/user/../etc"
    expect_error(tmp_path, data, "hdfs_app_path", "without . or ..")


def test_invalid_json(tmp_path):
    expect_error(tmp_path, '{"dbname": "x",\n  "kafka": }', "not valid JSON", "line 2")


def test_process_opt_that_breaks_parsing(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["process_opt"] = "-o csv"
    expect_error(tmp_path, data, "pipelines.flow_internals.process_opt", "-o", "remove it")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load(tmp_path / "absent.json")


@pytest.mark.parametrize("program", ["master_collector.py", "worker.py"])
def test_command_line_reports_the_error_and_exits_2(tmp_path, program):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["collector_path"] = str(tmp_path / "missing-dir")
    conf = write(tmp_path, data)
    args = ["-w", "2"] if program.startswith("master") else ["-i", "0"]
    result = subprocess.run([sys.executable, str(REPO / program), "-t", "flow_x", "-c", str(conf),
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown pipeline 'flow_x'" in result.stderr
    assert "Traceback" not in result.stderr


# -- kafka: brokers, TLS and SASL --------------------------------------------------

SECRET = "hunter2-Zq9!never-shown"


def kafka_file(tmp_path: Path, **kafka) -> dict:
    data = original_file(tmp_path)
    data["kafka"].update(kafka)
    return data


def pem_files(tmp_path: Path) -> dict[str, Path]:
    """A self-signed certificate and its key, made with openssl."""
    d = tmp_path / "tls"
    d.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(d / "client.key"), "-out", str(d / "client.pem"), "-days", "2", "-subj",
                    "/CN=spot-ingest test"], check=True, capture_output=True, timeout=60)
    return {"cert": d / "client.pem", "key": d / "client.key"}


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "kafka.password"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def test_bootstrap_list_with_and_without_ports(tmp_path):
    data = kafka_file(tmp_path, kafka_server="k1.example, k2.example:9093,[::1]:9094,10.0.0.7",
                      kafka_port="9092")
    kafka = load(write(tmp_path, data)).kafka
    assert kafka.bootstrap == "k1.example:9092,k2.example:9093,[::1]:9094,10.0.0.7:9092"
    assert kafka.brokers == (("k1.example", 9092), ("k2.example", 9093), ("::1", 9094),
                             ("10.0.0.7", 9092))
    # Every entry with its port: kafka_port may be left out.
    del data["kafka"]["kafka_port"]
    data["kafka"]["kafka_server"] = "k1.example:9093,k2.example:9094"
    assert load(write(tmp_path, data)).kafka.bootstrap == "k1.example:9093,k2.example:9094"


@pytest.mark.parametrize("server, problem", [
    ("k1.example,,k2.example", "has an empty entry"),
    ("k1.example:90x2", "'k1.example:90x2': port '90x2' is not a number from 1 to 65535"),
    ("k1.example:70000", "port '70000' is not a number from 1 to 65535"),
    ("tcp://k1.example:9092", "'tcp://k1.example:9092' is not host or host:port"),
    ("[::1", "'[::1' lacks the closing ] of an [IPv6 address]"),
    ("[]:9092", "'[]:9092' has no host name"),
])
def test_bad_bootstrap_entries(tmp_path, server, problem):
    expect_error(tmp_path, kafka_file(tmp_path, kafka_server=server), "kafka.kafka_server:", problem)


def test_entry_without_port_needs_kafka_port(tmp_path):
    data = kafka_file(tmp_path, kafka_server="k1.example:9093,k2.example")
    del data["kafka"]["kafka_port"]
    expect_error(tmp_path, data, "kafka.kafka_port: missing key")


def test_unknown_kafka_key_is_refused_with_the_known_ones(tmp_path):
    message = expect_error(tmp_path, kafka_file(tmp_path, ssl_ca_file="ca.pem"),
                           "kafka.ssl_ca_file: unknown key; known keys: embedded_broker, "
                           "kafka_port, kafka_server, message_size, sasl_kerberos_service_name, "
                           "sasl_mechanism, sasl_password_env, sasl_password_file, "
                           "sasl_username, security_protocol, ssl_cafile, ssl_certfile, "
                           "ssl_check_hostname, ssl_keyfile, zookeeper_port, zookeeper_server, "
                           "zookeper_port, zookeper_server")
    assert len(message.splitlines()) == 1


def test_original_and_zookeeper_spellings_still_load(tmp_path, caplog):
    caplog.set_level("INFO")
    data = kafka_file(tmp_path, zookeeper_server="zk.example", zookeeper_port="2181",
                      embedded_broker=False)
    kafka = load(write(tmp_path, data)).kafka
    assert kafka.security_protocol == "PLAINTEXT" and kafka.bootstrap == "kafka.example:9092"
    assert "kafka.zookeeper_server is ignored" in caplog.text


@pytest.mark.parametrize("key", ["sasl_password", "password", "sasl_plain_password"])
def test_a_password_in_the_file_is_refused_without_repeating_it(tmp_path, key):
    message = expect_error(tmp_path, kafka_file(tmp_path, **{key: SECRET}), f"kafka.{key}: a "
                           "password is never written in this file", "sasl_password_file",
                           "sasl_password_env")
    assert SECRET not in message


def test_security_protocol_values(tmp_path):
    expect_error(tmp_path, kafka_file(tmp_path, security_protocol="TLS"),
                 "kafka.security_protocol: 'TLS' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, "
                 "SASL_SSL")
    assert load(write(tmp_path, kafka_file(tmp_path, security_protocol="ssl"))).kafka \
        .security_protocol == "SSL"


def test_tls_files_relative_to_the_configuration_and_checked(tmp_path):
    pem = pem_files(tmp_path)
    data = kafka_file(tmp_path, security_protocol="SSL", ssl_cafile="tls/client.pem",
                      ssl_certfile="tls/client.pem", ssl_keyfile="tls/client.key",
                      ssl_check_hostname=False)
    kafka = load(write(tmp_path, data)).kafka
    assert (kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile) == \
        (pem["cert"], pem["cert"], pem["key"])
    assert kafka.ssl_check_hostname is False
    from spot_ingest.kafka_security import client_kwargs
    assert client_kwargs(kafka) == {
        "bootstrap_servers": "kafka.example:9092", "security_protocol": "SSL",
        "ssl_check_hostname": False, "ssl_cafile": str(pem["cert"]),
        "ssl_certfile": str(pem["cert"]), "ssl_keyfile": str(pem["key"])}


def test_tls_file_errors(tmp_path):
    pem = pem_files(tmp_path)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    tls = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
           "sasl_username": "u", "sasl_password_file": str(secret_file(tmp_path))}
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_cafile="missing.pem"),
                 f"kafka.ssl_cafile: file '{tmp_path / 'missing.pem'}' does not exist")
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_cafile="tls"),
                 f"kafka.ssl_cafile: '{tmp_path / 'tls'}' is not a file")
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_cafile="garbage.pem"),
                 f"kafka.ssl_cafile: '{tmp_path / 'garbage.pem'}' holds no PEM certificate")
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_certfile=str(pem["cert"]),
                                      ssl_keyfile="nokey.pem"),
                 f"kafka.ssl_keyfile: file '{tmp_path / 'nokey.pem'}' does not exist")
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_keyfile=str(pem["key"])),
                 "kafka.ssl_keyfile: set without ssl_certfile")
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_certfile="garbage.pem"),
                 "kafka.ssl_certfile: cannot use", "as the client certificate and key")
    expect_error(tmp_path, kafka_file(tmp_path, **tls, ssl_check_hostname="no"),
                 'kafka.ssl_check_hostname: expected true or false, got "no"')


@pytest.mark.parametrize("protocol, key, value, problem", [
    ("PLAINTEXT", "ssl_cafile", "ca.pem", "set, but security_protocol is PLAINTEXT, which does "
                                          "not use TLS; set security_protocol to SSL or SASL_SSL"),
    ("SASL_PLAINTEXT", "ssl_check_hostname", False, "set, but security_protocol is "
                                                    "SASL_PLAINTEXT, which does not use TLS"),
    ("SSL", "sasl_mechanism", "PLAIN", "set, but security_protocol is SSL, which does not "
                                       "authenticate with SASL"),
    ("PLAINTEXT", "sasl_username", "alice", "set, but security_protocol is PLAINTEXT, which "
                                            "does not authenticate with SASL"),
])
def test_tls_or_sasl_keys_with_a_protocol_that_ignores_them_are_errors(tmp_path, protocol, key,
                                                                        value, problem):
    expect_error(tmp_path, kafka_file(tmp_path, security_protocol=protocol, **{key: value}),
                 f"kafka.{key}: {problem}")


def test_sasl_combinations(tmp_path, monkeypatch):
    pw = str(secret_file(tmp_path))
    sasl = {"security_protocol": "SASL_SSL"}
    expect_error(tmp_path, kafka_file(tmp_path, **sasl),
                 "kafka.sasl_mechanism: missing key (security_protocol SASL_SSL needs one of "
                 "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, GSSAPI)")
    expect_error(tmp_path, kafka_file(tmp_path, **sasl, sasl_mechanism="SCRAM-SHA-1"),
                 "kafka.sasl_mechanism: 'SCRAM-SHA-1' is not one of PLAIN, SCRAM-SHA-256, "
                 "SCRAM-SHA-512, GSSAPI")
    expect_error(tmp_path, kafka_file(tmp_path, **sasl, sasl_mechanism="PLAIN",
                                      sasl_password_file=pw),
                 "kafka.sasl_username: missing key (sasl_mechanism PLAIN needs a user name)")
    expect_error(tmp_path, kafka_file(tmp_path, **sasl, sasl_mechanism="SCRAM-SHA-512",
                                      sasl_username="alice"),
                 "kafka.sasl_password_file: missing key (sasl_mechanism SCRAM-SHA-512 needs a "
                 "password: give sasl_password_file or sasl_password_env)")
    monkeypatch.setenv("SPOT_TEST_PW", SECRET)
    expect_error(tmp_path, kafka_file(tmp_path, **sasl, sasl_mechanism="SCRAM-SHA-512",
                                      sasl_username="alice", sasl_password_file=pw,
                                      sasl_password_env="SPOT_TEST_PW"),
                 "kafka.sasl_password_env: set together with sasl_password_file; give one of them")
    expect_error(tmp_path, kafka_file(tmp_path, **sasl, sasl_mechanism="SCRAM-SHA-256",
                                      sasl_username="alice", sasl_password_file=pw,
                                      sasl_kerberos_service_name="kafka"),
                 "kafka.sasl_kerberos_service_name: only used with GSSAPI, but sasl_mechanism "
                 "is SCRAM-SHA-256")
    expect_error(tmp_path, kafka_file(tmp_path, **sasl, sasl_mechanism="GSSAPI",
                                      sasl_username="alice"),
                 "kafka.sasl_username: not used with GSSAPI")
    expect_error(tmp_path, kafka_file(tmp_path, security_protocol="SASL_SSL",
                                      embedded_broker=True, sasl_mechanism="PLAIN"),
                 "kafka.embedded_broker: the embedded broker speaks PLAINTEXT only, but "
                 "security_protocol is SASL_SSL")


def test_gssapi_needs_its_package(tmp_path):
    import importlib.util
    data = kafka_file(tmp_path, security_protocol="SASL_PLAINTEXT", sasl_mechanism="GSSAPI",
                      sasl_kerberos_service_name="kafka-prod")
    if importlib.util.find_spec("gssapi") is None:
        expect_error(tmp_path, data, "kafka.sasl_mechanism: GSSAPI needs the Python package gssapi")
    else:
        kafka = load(write(tmp_path, data)).kafka
        assert kafka.sasl_kerberos_service_name == "kafka-prod"


def test_password_sources_checked_without_showing_a_password(tmp_path, monkeypatch):
    base = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": "alice"}
    (tmp_path / "empty.pw").write_text("")
    expect_error(tmp_path, kafka_file(tmp_path, **base, sasl_password_file="empty.pw"),
                 f"kafka.sasl_password_file: file '{tmp_path / 'empty.pw'}' is empty")
    expect_error(tmp_path, kafka_file(tmp_path, **base, sasl_password_file="absent.pw"),
                 f"kafka.sasl_password_file: file '{tmp_path / 'absent.pw'}' does not exist")
    monkeypatch.delenv("SPOT_TEST_UNSET_PW", raising=False)
    expect_error(tmp_path, kafka_file(tmp_path, **base, sasl_password_env="SPOT_TEST_UNSET_PW"),
                 "kafka.sasl_password_env: the environment variable SPOT_TEST_UNSET_PW is not "
                 "set or empty")
    # The password written where the variable's name belongs is not repeated.
    message = expect_error(tmp_path, kafka_file(tmp_path, **base, sasl_password_env=SECRET),
                           "kafka.sasl_password_env: is not the name of an environment variable "
                           "(the value is not shown")
    assert SECRET not in message


def test_the_password_is_in_no_repr_no_json_and_no_error(tmp_path, monkeypatch):
    from spot_ingest.kafka_security import PasswordError, client_kwargs, read_password
    pw = secret_file(tmp_path)
    data = kafka_file(tmp_path, security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="alice", sasl_password_file="kafka.password")
    cfg = load(write(tmp_path, data))
    kafka = cfg.kafka
    assert kafka.sasl_password_file == pw
    kwargs = client_kwargs(kafka)
    assert kwargs["sasl_plain_password"].encode() == SECRET.encode()
    shown = [repr(cfg), repr(kafka), str(kafka), kafka.to_json(), repr(kwargs), str(kwargs),
             f"{kwargs['sasl_plain_password']}", "%s" % kwargs["sasl_plain_password"]]
    assert not [s for s in shown if SECRET in s]
    assert KafkaConfig.from_json(kafka.to_json()) == kafka
    # The file gone after loading: the error names the file, not its content.
    pw.unlink()
    with pytest.raises(PasswordError) as info:
        read_password(kafka)
    assert str(info.value) == f"kafka.sasl_password_file: cannot read '{pw}': No such file or directory"
    # From an environment variable.
    monkeypatch.setenv("SPOT_TEST_PW", SECRET)
    data["kafka"].pop("sasl_password_file")
    data["kafka"]["sasl_password_env"] = "SPOT_TEST_PW"
    kafka = load(write(tmp_path, data)).kafka
    assert client_kwargs(kafka)["sasl_plain_password"].encode() == SECRET.encode()
    assert SECRET not in repr(kafka) + kafka.to_json()
    monkeypatch.setenv("SPOT_TEST_PW", "")
    with pytest.raises(PasswordError) as info:
        read_password(kafka)
    assert "the environment variable SPOT_TEST_PW (kafka.sasl_password_env) is empty" in str(info.value)


def test_kafka_config_is_frozen_and_takes_no_bare_string(tmp_path):
    import dataclasses
    from spot_ingest.kafka_security import client_kwargs
    kafka = load(write(tmp_path, original_file(tmp_path))).kafka
    with pytest.raises(dataclasses.FrozenInstanceError):
        kafka.security_protocol = "SSL"
    with pytest.raises(TypeError, match="expected a KafkaConfig"):
        client_kwargs("kafka.example:9092")
    assert client_kwargs(kafka) == {"bootstrap_servers": "kafka.example:9092",
                                    "security_protocol": "PLAINTEXT"}


# -- numbers: never NaN or infinite; settle_seconds may be 0, never negative

def load_and_use(tmp_path, data, pipeline):
    cfg = load(write(tmp_path, data))
    return cfg.pipeline(pipeline)


NUMBER_KEYS = [   # (where in the file, pipeline used, key in the message, what it expects)
    (("pipelines", "flow_internals", "settle_seconds"), "flow_internals",
     "pipelines.flow_internals.settle_seconds", "expected a number of 0 or more"),
    (("ingestion_interval",), "flow_internals", "ingestion_interval",
     "expected a positive number"),
    (("pipelines", "flow_internals", "max_file_size"), "flow_internals",
     "pipelines.flow_internals.max_file_size", "expected a positive whole number"),
    (("pipelines", "dns_server_1", "pkt_num"), "dns_server_1",
     "pipelines.dns_server_1.pkt_num", "expected a positive whole number"),
    (("kafka", "message_size"), "flow_internals", "kafka.message_size",
     "expected a positive whole number"),
]


@pytest.mark.parametrize("where, pipeline, key, expects", NUMBER_KEYS,
                         ids=[k[2] for k in NUMBER_KEYS])
@pytest.mark.parametrize("value, shown", [
    (float("nan"), "NaN"), (float("inf"), "Infinity"), (float("-inf"), "-Infinity"),
    ("nan", '"nan"'), ("inf", '"inf"'), ("1e999", '"1e999"'), (-1, "-1"), ("-1", '"-1"'),
], ids=["NaN", "Infinity", "-Infinity", "str-nan", "str-inf", "str-1e999", "-1", "str--1"])
def test_numbers_that_are_not_finite_or_negative_are_refused(tmp_path, where, pipeline, key,
                                                              expects, value, shown):
    data = original_file(tmp_path)
    node = data
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = value
    text = json.dumps(data)            # Python writes NaN and Infinity, as its json reads them
    assert ("NaN" in text or "Infinity" in text) == isinstance(value, float)
    with pytest.raises(ConfigError) as info:
        load_and_use(tmp_path, text, pipeline)
    assert str(info.value) == f"{tmp_path / 'ingest_conf.json'}: {key}: {expects}, got {shown}"


@pytest.mark.parametrize("value, expected", [(0, 0.0), ("0", 0.0), (2.5, 2.5), ("1.5", 1.5)])
def test_settle_seconds_may_be_zero(tmp_path, value, expected):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["settle_seconds"] = value
    assert load_and_use(tmp_path, data, "flow_internals").settle_seconds == expected


# -- a bad process_opt makes its pipeline unusable, not the file

@pytest.mark.parametrize("bad, opt, fragments", [
    ("flow_internals", "-aw /tmp/spot-x.nfcapd",
     ["pipelines.flow_internals.process_opt: nfdump options not allowed: -a (aggregates",
      "-w /tmp/spot-x.nfcapd (writes a file)", "remove it"]),
    ("dns_server_1", "-o tls.keylog_file:/tmp/keys",
     ["pipelines.dns_server_1.process_opt: tshark preference tls.keylog_file", "not allowed"]),
    ("dns_server_1", "'1) || (1'",
     ["pipelines.dns_server_1.process_opt: display filter '1) || (1' cannot be combined",
      "it closes a parenthesis it did not open"]),
])
def test_bad_process_opt_stops_only_its_own_pipeline(tmp_path, bad, opt, fragments):
    data = original_file(tmp_path)
    data["pipelines"][bad]["process_opt"] = opt
    cfg = load(write(tmp_path, data))
    other = next(name for name in data["pipelines"] if name != bad)
    assert cfg.pipeline(other).name == other and other in cfg.pipelines
    assert bad not in cfg.pipelines and bad in cfg.unusable_pipelines
    with pytest.raises(ConfigError) as info:
        cfg.pipeline(bad)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'ingest_conf.json'}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    # The pipeline is still listed where a name is looked up.
    with pytest.raises(ConfigError, match="pipelines in this file: dns_server_1, flow_internals"):
        cfg.pipeline("nope")


def test_worker_of_a_pipeline_with_bad_process_opt_exits_2_with_one_line(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["process_opt"] = "-c5 proto tcp"
    conf = write(tmp_path, data)
    result = subprocess.run([sys.executable, str(REPO / "worker.py"), "-t", "flow_internals",
                             "-c", str(conf), "-i", "0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "pipelines.flow_internals.process_opt: nfdump option not allowed: -c 5 (stops" \
        in result.stderr
    assert "Traceback" not in result.stderr


def test_message_size_above_what_a_message_may_hold_is_refused(tmp_path):
    data = original_file(tmp_path)
    data["kafka"]["message_size"] = 50_000_000
    expect_error(tmp_path, data, "kafka.message_size: 50000000 bytes is above the 16777216 bytes")


@pytest.mark.parametrize("keys, fragment", [
    ({"file_mode": "0644"}, "file_mode: 0644 must be dir_mode (0750) without its execute bits"),
    ({"dir_mode": "rwx"}, "dir_mode: expected an octal mode such as 0750"),
    ({"dir_mode": "0050", "file_mode": "0040"}, "dir_mode: 0050: the owner needs rwx"),
])
def test_file_and_dir_modes_are_checked(tmp_path, keys, fragment):
    data = original_file(tmp_path)
    data.update(keys)
    expect_error(tmp_path, data, fragment)


def test_modes_become_one_umask_and_retention_and_timeout_load(tmp_path):
    data = original_file(tmp_path)
    data.update(file_mode="0660", dir_mode="0770", binary_retention_days=30)
    data["pipelines"]["flow_internals"]["convert_timeout"] = 90
    cfg = load(write(tmp_path, data))
    assert cfg.umask == 0o007 and cfg.binary_retention_days == 30.0
    assert cfg.pipeline("flow_internals").convert_timeout == 90.0
    assert load(write(tmp_path, original_file(tmp_path))).umask == 0o027


def test_signing_key_file_is_read_and_checked(tmp_path):
    from spot_ingest.config import read_signing_key
    data = original_file(tmp_path)
    data["signing_key_file"] = "missing.key"
    expect_error(tmp_path, data, "signing_key_file: cannot read", "missing.key")
    (tmp_path / "k").write_text("z" * 48 + "\n")
    data["signing_key_file"] = "k"
    cfg = load(write(tmp_path, data))
    assert read_signing_key(cfg) == b"z" * 48
    assert "zzzz" not in repr(cfg)
