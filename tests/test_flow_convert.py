"""The flow pipeline's conversion, checked against nfdump's own csv export.

Inputs are real nfcapd files: written by nfcapd from NetFlow v5 datagrams,
from the export packets of real routers and probes (../shared/data), and by
nfpcapd from a pcap (for IPv6 and multi-hour captures).
"""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import dpkt
import pyarrow as pa
import pytest

from conftest import SHARED_DATA, reference_rows, table_rows
from pipelines.flow import FLOW, TABLE_SCHEMA
from pipelines.flow.sample import Collector
from spot_ingest.pipeline import BadInputError

EXPORTER_ORDER = [  # templates before the data that needs them
    "template.pcap", "data.pcap", "icmp-template.pcap", "icmp-data.pcap",
    "ipfix-srv6-template.pcap", "ipfix-srv6-data.pcap", "ipfixprobe-templates.pcap",
    "ipfixprobe-data.pcap", "juniper-cpid-template.pcap", "juniper-cpid-data.pcap", "nfv5.pcap",
    "nat.pcap", "physicalinterfaces.pcap", "mpls.pcap", "datalink-template.pcap",
    "datalink-data.pcap", "samplingrate-template.pcap", "samplingrate-data.pcap",
    "multiplesamplingrates-template.pcap", "multiplesamplingrates-data.pcap",
    "options-template.pcap", "options-data.pcap", "data+templates.pcap",
]


def convert(path: Path) -> pa.Table:
    return pa.Table.from_batches(list(FLOW.convert(path)), FLOW.full_schema)


def udp_payloads(pcap: Path) -> list[bytes]:
    with open(pcap, "rb") as f:
        return [bytes(dpkt.ethernet.Ethernet(buf).data.data.data) for _, buf in dpkt.pcap.Reader(f)]


@pytest.fixture(scope="module")
def exporter_file(tmp_path_factory) -> Path:
    """Export packets of real devices (Cisco, Juniper, ipfixprobe...) replayed to nfcapd."""
    folder = SHARED_DATA / "netflow-exporters"
    assert folder.is_dir(), f"test data missing: {folder}"
    collector = Collector(tmp_path_factory.mktemp("exporters"))
    datagrams = [d for name in EXPORTER_ORDER for d in udp_payloads(folder / name)]
    collector.send(datagrams)
    return collector.close()


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
    ip6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src),
                       dst=socket.inet_pton(socket.AF_INET6, dst), nxt=17, hlim=64, data=udp,
                       plen=len(udp))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=0x86DD, data=ip6))


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
        assert table_rows(table) == reference_rows([path])


def test_real_exporters_match_nfdump_csv(exporter_file):
    table = convert(exporter_file)
    assert table.num_rows > 20
    assert table_rows(table) == reference_rows([exporter_file])
    sips = set(table.column("sip").to_pylist())
    assert any(":" in ip for ip in sips), "the exporter data holds IPv6 flows"
    assert {"TCP", "UDP", "ICMP"} <= set(table.column("proto").to_pylist())
    assert any(a > 0 for a in table.column("sas").to_pylist())


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
    assert table_rows(pa.Table.from_pylist(rows, FLOW.full_schema)) == reference_rows(files)


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
    assert rows.num_rows == sum(1 for r in reference_rows([nfcapd_files[0]]) if r[4] == "TCP")


def test_process_opt_that_changes_output_is_refused():
    with pytest.raises(ValueError, match="-o"):
        FLOW.parse_options({"process_opt": "-o csv"}, lambda k, p: ValueError(f"{k}: {p}"))
