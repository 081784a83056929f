"""Blue Coat ProxySG access logs in W3C ELFF, for the demo, tests and benchmarks.

No ProxySG runs here, so these lines are written by this module, following
the appliance's format: ``#Fields:`` headers naming the fields in force,
space-separated values, double quotes around values with spaces, ``-`` for
an empty value. Layouts seen in the field are provided: the original Spot
order (27 fields), the appliance's bcreportermain order (24 and 27 fields),
and one with extra fields.

    python -m pipelines.proxy.sample OUT.log --lines 1000
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from . import ORIGINAL_FIELDS

MAIN_24 = ("date time time-taken c-ip cs-username cs-auth-group x-exception-id sc-filter-result "
           "cs-categories cs(Referer) sc-status s-action cs-method rs(Content-Type) cs-uri-scheme "
           "cs-host cs-uri-port cs-uri-path cs-uri-query cs-uri-extension cs(User-Agent) s-ip "
           "sc-bytes cs-bytes")
MAIN_27 = MAIN_24 + " x-virus-id x-bluecoat-application-name x-bluecoat-application-operation"
WITH_EXTRAS = MAIN_27 + " s-supplier-name x-rs-certificate-validate-status cs-threat-risk"
LAYOUTS = {"original": ORIGINAL_FIELDS, "main24": MAIN_24, "main27": MAIN_27, "extras": WITH_EXTRAS}

AGENTS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0 Safari/537.36",
          "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
          "curl/8.4.0", "-"]
CATEGORIES = ["Technology/Internet", "News/Media", "Web Ads/Analytics",
              "Computers/Internet;Business/Economy", "Search Engines/Portals", "unavailable"]
HOSTS = ["www.example.com", "cdn.example.net", "api.example.org", "news.example.co.uk"]


def _value(name: str, rnd: random.Random, when: float) -> str:
    host = rnd.choice(HOSTS)
    v = {
        "date": time.strftime("%Y-%m-%d", time.gmtime(when)),
        "time": time.strftime("%H:%M:%S", time.gmtime(when)),
        "time-taken": str(rnd.randrange(1, 90_000)),
        "c-ip": f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}",
        "cs-username": rnd.choice(["-", "alice", "bob", "DOMAIN\\carol"]),
        "cs-auth-group": rnd.choice(["-", "staff", "Domain Users"]),
        "x-exception-id": rnd.choice(["-", "-", "policy_denied", "dns_unresolved_hostname"]),
        "sc-filter-result": rnd.choice(["OBSERVED", "PROXIED", "DENIED"]),
        "cs-categories": rnd.choice(CATEGORIES),
        "cs(Referer)": rnd.choice(["-", f"https://{host}/index.html"]),
        "sc-status": rnd.choice(["200", "200", "304", "404", "403", "502"]),
        "s-action": rnd.choice(["TCP_HIT", "TCP_MISS", "TCP_NC_MISS", "TCP_DENIED"]),
        "cs-method": rnd.choice(["GET", "GET", "POST", "CONNECT"]),
        "rs(Content-Type)": rnd.choice(["text/html;%20charset=UTF-8", "image/png", "-",
                                        "application/json"]),
        "cs-uri-scheme": rnd.choice(["http", "https"]),
        "cs-host": host,
        "cs-uri-port": rnd.choice(["80", "443", "8080"]),
        "cs-uri-path": rnd.choice(["/", "/index.html", "/api/v1/items", "/img/logo.png"]),
        "cs-uri-query": rnd.choice(["-", "?q=1", f"?id={rnd.randrange(10**6)}"]),
        "cs-uri-extension": rnd.choice(["-", "html", "png", "js"]),
        "cs(User-Agent)": rnd.choice(AGENTS),
        "s-ip": f"192.168.{rnd.randrange(4)}.{rnd.randrange(1, 255)}",
        "sc-bytes": str(rnd.randrange(0, 2_000_000)),
        "cs-bytes": str(rnd.randrange(0, 20_000)),
        "x-virus-id": "-",
        "x-bluecoat-application-name": rnd.choice(["-", "Google Search", "Office 365"]),
        "x-bluecoat-application-operation": rnd.choice(["-", "Search", "Upload File"]),
        "s-supplier-name": host,
        "x-rs-certificate-validate-status": rnd.choice(["-", "CERT_VALID"]),
        "cs-threat-risk": str(rnd.randrange(1, 10)),
    }[name]
    return f'"{v}"' if " " in v else v


def log_lines(count: int, fields: str, seed: int = 1, start: float | None = None):
    rnd = random.Random(seed)
    names = fields.split()
    when = start if start is not None else time.time() - 3600
    for i in range(count):
        yield " ".join(_value(n, rnd, when + i * 0.01) for n in names)


def header(fields: str, when: float | None = None) -> list[str]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when or time.time()))
    return ["#Software: SGOS 6.7.5.3", "#Version: 1.0", f"#Date: {stamp}", f"#Fields: {fields}"]


def write_log(path: Path, lines: int, seed: int = 1, layout: str = "main27",
              start: float | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = LAYOUTS[layout]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(header(fields, start)) + "\n")
        for line in log_lines(lines, fields, seed, start):
            f.write(line + "\n")
    tmp.rename(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="main27")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(write_log(args.out, args.lines, args.seed, args.layout))


if __name__ == "__main__":
    main()
