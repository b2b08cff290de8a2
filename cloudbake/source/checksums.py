"""Checksum files as distributions publish them: GNU style (``<hex>  <name>``, Ubuntu's SHA256SUMS and
Debian's SHA512SUMS) and BSD style (``SHA256 (<name>) = <hex>``, Fedora's CHECKSUM)."""

from __future__ import annotations

import re

from cloudbake.core.errors import PipelineError

HEX_DIGITS = {"sha256": 64, "sha512": 128}


def parse_sums(text: str, url: str, algorithm: str = "sha256") -> dict[str, str]:
    """name -> digest from a GNU-style file: ``<hex> *<name>``, ``<hex>  <name>``, ``./name``, blank lines."""
    digits = HEX_DIGITS[algorithm]
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"(\S+)\s+\*?(?:\./)?(.+)", line)
        if not match or not re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", match.group(1)):
            raise PipelineError(f"{url}:{number}: malformed line in {algorithm.upper()}SUMS: {raw[:100]!r}",
                                hint=f"expected '<{digits} hex digits> *<file name>'")
        entries[match.group(2)] = match.group(1).lower()
    return entries


def parse_bsd_sums(text: str, url: str) -> dict[str, tuple[str, str]]:
    """name -> (algorithm, digest) from a BSD-style file; comments and blank lines skipped, other lines refused."""
    entries: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"(SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)", line)
        if not match or len(match.group(3)) != HEX_DIGITS[match.group(1).lower()]:
            raise PipelineError(f"{url}:{number}: malformed checksum line: {raw[:100]!r}",
                                hint="expected 'SHA256 (<file name>) = <64 hex digits>'")
        entries[match.group(2)] = (match.group(1).lower(), match.group(3).lower())
    return entries
