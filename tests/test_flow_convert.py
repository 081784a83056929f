"""The flow pipeline's conversion, checked against nfdump's own csv export.

Inputs are real nfcapd files: written by nfcapd from NetFlow v5 datagrams,
from the NetFlow v9 and IPFIX exports of real exporters (softflowd and
nfreplay), and by nfpcapd from a pcap (for IPv6 and multi-hour captures).
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import dpkt
import pyarrow as pa
import pytest

from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow import FLOW, TABLE_SCHEMA
from spot_ingest.pipelines.flow.sample import Collector
from spot_ingest.pipeline import BadInputError

def convert(path: Path) -> pa.Table:
    return pa.Table.from_batches(list(FLOW.convert(path)), FLOW.full_schema)


def mixed_traffic() -> list[tuple[float, bytes]]:
    """Frames of IPv4 and IPv6 TCP, UDP, ICMP and ICMPv6 conversations."""
    frames, t = [], 1763700000.0
    for i in range(12):
        t += 0.25
        v4_client, v6_client = f"10.20.{i}.7", f"2001:db8:20::{i + 1:x}"
        tcp = dpkt.tcp.TCP(sport=40000 + i, dport=443, flags=dpkt.tcp.TH_SYN)
        frames.append((t, ipv4_frame(v4_client, "192.0.2.10", dpkt.ip.IP_PROTO_TCP, tcp)))
        ack = dpkt.tcp.TCP(sport=443, dport=40000 + i, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)
        frames.append((t + 0.01, ipv4_frame("192.0.2.10", v4_client, dpkt.ip.IP_PROTO_TCP, ack)))
        udp = dpkt.udp.UDP(sport=5000 + i, dport=53, data=b"q" * (20 + i))
        udp.ulen = len(udp)
        frames.append((t + 0.02, ipv4_frame(v4_client, "192.0.2.53", dpkt.ip.IP_PROTO_UDP, udp)))
        echo = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=i, seq=1, data=b"ping"))
        frames.append((t + 0.03, ipv4_frame(v4_client, "198.51.100.1", dpkt.ip.IP_PROTO_ICMP, echo)))
        frames.append((t + 0.04, ipv6_udp_frame(v6_client, "2001:db8::53", 6000 + i, 53)))
        echo6 = dpkt.icmp6.ICMP6(type=128, code=0, data=dpkt.icmp6.ICMP6.Echo(id=i, seq=1))
        frames.append((t + 0.05, ipv6_frame(v6_client, "2001:db8::1", 58, echo6)))
    return frames


@pytest.fixture(scope="module")
def exporter_file(tmp_path_factory, nfcapd_files) -> Path:
    """Flows as real exporters send them, received by one real nfcapd:
    softflowd exports a pcap of mixed IPv4/IPv6 traffic as NetFlow v9 and as
    IPFIX, and nfreplay re-exports an nfcapd file (with interfaces and AS
    numbers) as NetFlow v9."""
    root = tmp_path_factory.mktemp("exporters")
    pcap = root / "mixed.pcap"
    with open(pcap, "wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, frame in mixed_traffic():
            writer.writepkt(frame, ts=ts)
    collector = Collector(root / "out")
    target = f"127.0.0.1:{collector.port}"
    for version in ("9", "10"):
        # "-a": flow times from the packets. "-c none": without a control socket (softflowd 1.1 in -r mode sometimes
        # blocks in accept() on it before reading the file).
        subprocess.run([softflowd(), "-r", str(pcap), "-n", target, "-v", version, "-6", "-d", "-a",
                        "-p", "none", "-c", "none"], check=True, capture_output=True, timeout=60)
    subprocess.run(["nfreplay", "-r", str(nfcapd_files[3]), "-H", "127.0.0.1", "-p",
                    str(collector.port), "-v", "9"], check=True, capture_output=True, timeout=60)
    return collector.close()


def softflowd() -> str:
    import shutil
    found = shutil.which("softflowd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    assert found, "softflowd is missing: scripts/setup.sh --test installs it"
    return found


def pcap_to_nfcapd(packets, out_dir: Path) -> list[Path]:
    pcap = out_dir / "in.pcap"
    with open(pcap, "wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, frame in packets:
            writer.writepkt(frame, ts=ts)
    subprocess.run(["nfpcapd", "-r", str(pcap), "-w", str(out_dir)], check=True,
                   capture_output=True)
    return sorted(out_dir.glob("nfcapd.2*"))


def ipv6_udp_frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=b"q" * 12)
    udp.ulen = len(udp)
    return ipv6_frame(src, dst, dpkt.ip.IP_PROTO_UDP, udp)


def ipv6_frame(src: str, dst: str, next_header: int, payload) -> bytes:
    ip6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src),
                       dst=socket.inet_pton(socket.AF_INET6, dst), nxt=next_header, hlim=64,
                       data=payload, plen=len(payload))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=0x86DD, data=ip6))


def ipv4_frame(src: str, dst: str, proto: int, payload) -> bytes:
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64,
                    data=payload)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=0x0800, data=ip))


def test_schema_is_the_contract():
    assert TABLE_SCHEMA.names == [
        "treceived", "unix_tstamp", "tryear", "trmonth", "trday", "trhour", "trminute", "trsec",
        "tdur", "sip", "dip", "sport", "dport", "proto", "flag", "fwd", "stos", "ipkt", "ibyt",
        "opkt", "obyt", "input", "output", "sas", "das", "dtos", "dir", "rip"]
    types = {f.name: str(f.type) for f in TABLE_SCHEMA}
    assert types["unix_tstamp"] == "int64" and types["tdur"] == "float"
    assert types["sport"] == "int32" and types["ibyt"] == "int64" and types["proto"] == "string"
    assert [str(f.type) for f in FLOW.partition_schema] == ["int16", "int8", "int8", "int8"]


def test_v5_flows_match_nfdump_csv(nfcapd_files):
    for path in nfcapd_files[:2]:
        table = convert(path)
        assert table.schema == FLOW.full_schema
        assert flow_table_rows(table) == flow_reference_rows([path])


def test_real_exporters_match_nfdump_csv(exporter_file):
    table = convert(exporter_file)
    assert table.num_rows > 1500
    assert flow_table_rows(table) == flow_reference_rows([exporter_file])
    sips = set(table.column("sip").to_pylist())
    assert any(":" in ip for ip in sips), "the exporter data holds IPv6 flows"
    assert {"TCP", "UDP", "ICMP", "ICMP6"} <= set(table.column("proto").to_pylist())
    assert any(a > 0 for a in table.column("sas").to_pylist())
    assert len(set(table.column("rip").to_pylist())) >= 1


def test_derived_time_columns(nfcapd_files):
    table = convert(nfcapd_files[0]).to_pylist()
    for row in table[:50]:
        y, mo, d = row["treceived"][:10].split("-")
        hh, mm, ss = row["treceived"][11:].split(":")
        assert (row["tryear"], row["trmonth"], row["trday"]) == (int(y), int(mo), int(d))
        assert (row["trhour"], row["trminute"], row["trsec"]) == (int(hh), int(mm), int(ss))
        assert (row["y"], row["m"], row["d"], row["h"]) == (int(y), int(mo), int(d), int(hh))
        import calendar, time
        assert row["unix_tstamp"] == calendar.timegm(time.strptime(row["treceived"],
                                                                   "%Y-%m-%d %H:%M:%S"))


def test_ipv6_addresses_kept_in_full(tmp_path):
    long_src = "2001:db8:1234:5678:9abc:def0:1234:5678"
    frames = [(1463838000.5, ipv6_udp_frame(long_src, "fe80::1", 5353, 53)),
              (1463838001.5, ipv6_udp_frame("2001:db8::2", long_src, 53, 5353))]
    files = pcap_to_nfcapd(frames, tmp_path)
    rows = [r for f in files for r in convert(f).to_pylist()]
    assert {(r["sip"], r["dip"]) for r in rows} == {(long_src, "fe80::1"), ("2001:db8::2", long_src)}
    table = pa.Table.from_pylist(rows, FLOW.full_schema)
    assert flow_table_rows(table) == flow_reference_rows(files)


def test_file_with_no_flows_gives_no_rows(tmp_path):
    collector = Collector(tmp_path)
    empty_capture = collector.close()
    assert convert(empty_capture).num_rows == 0


@pytest.mark.parametrize("content", [b"", b"hello, not a capture\n", bytes(range(256)) * 400],
                         ids=["empty", "text", "binary-garbage"])
def test_unreadable_input_is_bad_input(tmp_path, content):
    path = tmp_path / "nfcapd.202611210000"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=str(path)):
        convert(path)


def test_truncated_nfcapd_is_bad_input(tmp_path, nfcapd_files):
    data = nfcapd_files[2].read_bytes()
    cut = tmp_path / "nfcapd.cut"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="nfcapd.cut"):
        convert(cut)


def test_process_opt_filter_is_passed_to_nfdump(nfcapd_files):
    from spot_ingest.config import PipelineConfig
    opts = FLOW.parse_options({"process_opt": "proto tcp"}, lambda k, p: ValueError(p))
    cfg = PipelineConfig("x", "flow", Path("."), Path("."), "proto tcp", (), "t", 1, 1, None,
                         True, opts)
    rows = pa.Table.from_batches(list(FLOW.convert(nfcapd_files[0], cfg)), FLOW.full_schema)
    protos = set(rows.column("proto").to_pylist())
    assert protos == {"TCP"}
    assert rows.num_rows == sum(1 for r in flow_reference_rows([nfcapd_files[0]]) if r[4] == "TCP")


def test_process_opt_that_changes_output_is_refused():
    with pytest.raises(ValueError, match="-o"):
        FLOW.parse_options({"process_opt": "-o csv"}, lambda k, p: ValueError(f"{k}: {p}"))


# -- process_opt: only a filter expression, parsed as nfdump's getopt parses it

def flow_options(process_opt: str):
    return FLOW.parse_options({"process_opt": process_opt}, lambda k, p: ValueError(f"{k}: {p}"))


def nfdump_rows(cmd: list[str]) -> int:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TZ": "UTC"},
                         stdin=subprocess.DEVNULL, timeout=60)
    assert out.returncode == 0, out.stderr
    return len(out.stdout.splitlines())


@pytest.mark.parametrize("template, named", [
    ("-aw {out}", ["-a ", "-w {out} (writes a file)"]),
    ("-w {out}", ["-w {out} (writes a file)"]),
    ("-aNw {out}", ["-a ", "-N ", "-w {out} (writes a file)"]),
    ("-Nw{out}", ["-w {out} (writes a file)"]),              # value glued to a cluster
    ("proto tcp -w {out}", ["-w {out} (writes a file)"]),    # getopt permutes: after the filter
    ("-zw {out}", ["-z ", "-w {out}"]),
], ids=["-aw", "-w", "-aNw", "-Nw-glued", "after-filter", "-zw"])
def test_process_opt_that_writes_a_file_is_refused(nfcapd_files, tmp_path, template, named):
    out = tmp_path / "written.nfcapd"
    opt = template.format(out=out)
    # What nfdump itself does with these arguments after the worker's own:
    # it writes the file (run for real, into tmp_path).
    subprocess.run(FLOW.nfdump_command(nfcapd_files[3], None) + shlex.split(opt),
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    assert out.is_file() and out.stat().st_size > 0
    out.unlink()
    with pytest.raises(ValueError) as info:
        flow_options(opt)
    message = str(info.value)
    assert message.startswith("process_opt: nfdump option") and message.endswith("remove it")
    for fragment in named:
        assert fragment.format(out=out) in message, message
    assert not out.exists()


@pytest.mark.parametrize("opt, named", [
    ("-c 5", "-c 5 (stops after that many flows"), ("-c5", "-c 5 (stops after"),
    ("-Nc5", "-c 5 (stops after"), ("-r x", "-r x (reads another file"),
    ("-rx", "-r x (reads another file"), ("-R /var/cache/nfdump", "-R /var/cache/nfdump (reads"),
    ("-f filter.txt", "-f filter.txt (reads the filter from a file"),
    ("-A srcip", "-A srcip (aggregates"), ("-Asrcip,dstip", "-A srcip,dstip (aggregates"),
    ("-a", "-a (aggregates"), ("-b", "-b (aggregates"), ("-s ip/bytes", "-s ip/bytes (prints"),
    ("-t 2026/11/21.00:00:00", "-t 2026/11/21.00:00:00 (drops the flows outside"),
    ("-o csv", "-o csv (sets the output format"), ("-ocsv", "-o csv (sets the output format"),
    ("-J 0", "-J 0 (rewrites the input file"), ("-i newident", "-i newident (rewrites"),
    ("not proto icmp -c 5", "-c 5 (stops after"),
])
def test_process_opt_options_are_refused_with_the_option_named(opt, named):
    with pytest.raises(ValueError) as info:
        flow_options(opt)
    assert named in str(info.value), str(info.value)
    assert str(info.value).startswith("process_opt: ")


def test_limit_option_would_drop_flows_silently(nfcapd_files):
    # -c 5 for real: nfdump prints 5 of the file's flows and says nothing.
    path = nfcapd_files[3]
    full = nfdump_rows(FLOW.nfdump_command(path, None))
    assert full == 1500
    assert nfdump_rows(FLOW.nfdump_command(path, None) + ["-c", "5"]) == 5
    with pytest.raises(ValueError, match=r"-c 5 \(stops after that many flows"):
        flow_options("-c 5")


@pytest.mark.parametrize("opt, problem", [
    ("-k", "nfdump has no option -k"), ("-ak", "nfdump has no option -k"),
    ("--write=x", "nfdump has no long options ('--write=x')"),
    ("-w", "nfdump option -w needs a value"), ("proto tcp -c", "nfdump option -c needs a value"),
])
def test_what_nfdump_getopt_rejects_is_refused(opt, problem):
    with pytest.raises(ValueError) as info:
        flow_options(opt)
    assert problem in str(info.value) and str(info.value).endswith("remove it")


def test_every_nfdump_option_is_decided_and_refused():
    from spot_ingest.pipelines.flow import NFDUMP_OPTION_REFUSED, NFDUMP_OPTSTRING
    usage = subprocess.run(["nfdump", "-h"], capture_output=True, text=True).stdout
    listed = {line[1] for line in usage.splitlines() if line[:1] == "-" and line[1:2].isalnum()}
    assert len(listed) > 30
    assert listed <= set(NFDUMP_OPTION_REFUSED), listed - set(NFDUMP_OPTION_REFUSED)
    for letter in NFDUMP_OPTION_REFUSED:
        opt = f"-{letter} x" if f"{letter}:" in NFDUMP_OPTSTRING else f"-{letter}"
        with pytest.raises(ValueError, match=f"-{letter}"):
            flow_options(opt)


def test_filter_goes_to_nfdump_as_one_argument_after_double_dash(nfcapd_files):
    assert flow_options("not proto icmp").nfdump_args == ("--", "not proto icmp")
    assert flow_options("'src port > 1024' and proto udp").nfdump_args == (
        "--", "src port > 1024 and proto udp")
    assert flow_options("-- proto tcp").nfdump_args == ("--", "proto tcp")
    assert flow_options("").nfdump_args == ()
    cmd = FLOW.nfdump_command(nfcapd_files[0], SimpleNamespace(options=flow_options("proto udp")))
    assert cmd[-2:] == ["--", "proto udp"]
    udp = sum(1 for r in flow_reference_rows([nfcapd_files[0]]) if r[4] == "UDP")
    assert 0 < udp == nfdump_rows(cmd)


def test_option_words_after_double_dash_are_a_filter_nfdump_refuses(tmp_path):
    # After "--" nothing is an option: "-w FILE" would be filter words, and
    # nfdump's own filter check (nfdump -Z, run at load) refuses them.
    out = tmp_path / "written.nfcapd"
    with pytest.raises(ValueError) as info:
        flow_options(f"-- proto tcp -w {out}")
    assert f"nfdump cannot use the filter 'proto tcp -w {out}'" in str(info.value)
    assert "syntax error" in str(info.value)
    assert not out.exists()


def test_filter_nfdump_cannot_compile_is_refused_at_load():
    with pytest.raises(ValueError) as info:
        flow_options("proto nosuchproto")
    assert str(info.value) == ("process_opt: nfdump cannot use the filter 'proto nosuchproto': "
                               "Line 1: Unknown protocol at 'nosuchproto'")
