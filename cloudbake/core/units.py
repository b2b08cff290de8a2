"""Sizes and durations in human units, parsed in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)", re.IGNORECASE)
_DURATION_FACTORS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# Far beyond any real memory, disk or artifact size, and any real timeout, yet small
# enough that every tool and every sleep below can take the value.
MAX_SIZE_BYTES = 1 << 50  # 1 PiB
MAX_DURATION_S = 30 * 24 * 3600.0  # 30 days


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``512M``, ``2G``, ``1.5GiB``, ``4096`` (binary units, as QEMU reads them)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 2G, 1.5GiB)")
    number, unit = match.groups()
    size = float(number) * _SIZE_FACTORS[unit.upper()]
    if not size <= MAX_SIZE_BYTES:
        raise ValueError(f"{text!r} is larger than the largest size cloudbake accepts (1024T)")
    return int(size)


@dataclass(frozen=True)
class DiskSize:
    """``disk.size``: absolute bytes, or growth over the upstream image when ``growth``."""

    bytes: int
    growth: bool

    def resolve(self, upstream_bytes: int) -> int:
        """Target virtual size for an upstream image of ``upstream_bytes``."""
        return upstream_bytes + self.bytes if self.growth else self.bytes

    def __str__(self) -> str:
        return ("+" if self.growth else "") + format_size(self.bytes)


def parse_disk_size(text: str) -> DiskSize:
    """``+20G`` (grow by) or ``25G`` (absolute)."""
    text = str(text).strip()
    growth = text.startswith("+")
    try:
        size = parse_size(text[1:] if growth else text)
    except ValueError:
        raise ValueError(f"{text!r} is not a disk size (examples: +20G to grow, 25G absolute)") from None
    if size <= 0:
        raise ValueError(f"{text!r} is not a disk size: it must be more than zero")
    return DiskSize(size, growth)


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``text``: ``90s``, ``30m``, ``1h30m``, ``250ms``; a bare number is seconds (at most 30 days)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        stripped = str(text).strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
            seconds = float(stripped)
        else:
            parts = _DURATION_PART.findall(stripped)
            if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", stripped):
                raise ValueError(f"{text!r} is not a duration (examples: 90s, 30m, 1h30m)")
            seconds = sum(float(n) * _DURATION_FACTORS[u.lower()] for n, u in parts)
    if not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"{text!r} is not a duration between 0 and 30 days")
    return seconds


def format_size(size: int) -> str:
    """Shortest exact binary-unit spelling: 21474836480 -> '20G'."""
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_FACTORS[unit]
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_bytes(size: float) -> str:
    """Approximate size for log lines: '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"
