"""Durations and sizes as people write them (``2h``, ``256MB``), for command
lines and the configuration alike."""
from __future__ import annotations

import re


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` or ``1d`` in seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found:
        raise ValueError(f"'{text}' is not a duration such as 2h, 30m, 90s or 1d")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def parse_size(text: str, allow_zero: bool = False) -> int:
    """``256MB``, ``1GB``, ``512KB`` or a number of bytes (powers of 1024)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not found or (float(found.group(1)) <= 0 and not allow_zero):
        raise ValueError(f"'{text}' is not a size such as 256MB or 1GB")
    unit = found.group(2).rstrip("B").rstrip("I")
    return int(float(found.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                         "T": 1 << 40}[unit])


def format_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"
