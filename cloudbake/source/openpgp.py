"""OpenPGP as cloudbake needs it: ASCII armor, key fingerprints, and gpgv's machine-readable verdict."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cloudbake.core.errors import PipelineError
from cloudbake.core.runner import run
from cloudbake.core.tools import require_tool


def dearmor(data: bytes, what: str = "OpenPGP data") -> bytes:
    """Binary OpenPGP data from ASCII armor (gpgv 2.2 reads only binary keyrings); binary passes through."""
    text = data.decode("ascii", errors="replace")
    if "-----BEGIN PGP" not in text:
        return data
    try:
        return _dearmor_text(text)
    except (IndexError, ValueError):
        raise PipelineError(f"{what}: malformed ASCII armor (no valid base64 between the BEGIN and END lines)",
                            hint="get the file again; an armored key or signature starts with "
                                 "'-----BEGIN PGP' and is base64 inside") from None


def dearmor_all(data: bytes, what: str = "OpenPGP data") -> bytes:
    """Every armored block of ``data`` in one binary keyring (a published key file holds several)."""
    text = data.decode("ascii", errors="replace")
    if "-----BEGIN PGP" not in text:
        return data
    blocks = ["-----BEGIN PGP" + part for part in text.split("-----BEGIN PGP")[1:]]
    return b"".join(dearmor(block.encode(), what) for block in blocks)


def _dearmor_text(text: str) -> bytes:
    body = text.split("-----BEGIN PGP", 1)[1].split("\n", 1)[1]
    body = body.split("-----END PGP", 1)[0]
    lines = body.strip().splitlines()
    # Armor headers end at the first blank line; the last line may be the CRC (=XXXX).
    if "" in [line.strip() for line in lines]:
        lines = lines[[line.strip() for line in lines].index("") + 1:]
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("=")]
    return base64.b64decode("".join(lines), validate=True)


def _packets(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of each OpenPGP packet (RFC 4880 section 4.2)."""
    pos = 0
    while pos < len(data):
        header = data[pos]
        if not header & 0x80:
            raise ValueError("not OpenPGP data")
        if header & 0x40:  # new format
            tag = header & 0x3F
            first = data[pos + 1]
            if first < 192:
                length, pos = first, pos + 2
            elif first < 224:
                length, pos = ((first - 192) << 8) + data[pos + 2] + 192, pos + 3
            elif first == 255:
                length, pos = int.from_bytes(data[pos + 2:pos + 6], "big"), pos + 6
            else:
                raise ValueError("partial packet lengths are not used in keys")
        else:
            tag = (header >> 2) & 0x0F
            kind = header & 0x03
            size = {0: 1, 1: 2, 2: 4}.get(kind)
            if size is None:
                raise ValueError("indeterminate packet length")
            length, pos = int.from_bytes(data[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        yield tag, data[pos:pos + length]
        pos += length


def _fingerprints_or_none(keyring: bytes) -> list[str]:
    try:
        return key_fingerprints(keyring)
    except (ValueError, IndexError):
        return []


def key_fingerprints(keyring: bytes) -> list[str]:
    """v4 fingerprints of the primary keys and subkeys in a binary keyring."""
    found = []
    for tag, body in _packets(keyring):
        if tag in (6, 14) and body and body[0] == 4:
            prefix = b"\x99" + len(body).to_bytes(2, "big")
            found.append(hashlib.sha1(prefix + body).hexdigest().upper())  # v4 fingerprints are SHA-1 by definition
    return found


# gpgv status codes that refuse a signature whatever else it says.
SIGNATURE_REFUSALS = {
    "REVKEYSIG": "it was made by a key that has been revoked",
    "EXPKEYSIG": "it was made by a key that has expired",
    "EXPSIG": "the signature itself has expired",
    "BADSIG": "the signature does not match the signed file (tampered or corrupted)",
    "ERRSIG": "the signature could not be checked (unknown key or algorithm)",
}


@dataclass(frozen=True)
class Signature:
    fingerprint: str
    created: str  # ISO 8601, UTC


def check_signature(sums: bytes, signature: bytes, keyring: Path, fingerprints: tuple[str, ...],
                    what: str = "SHA256SUMS") -> Signature:
    """gpgv's machine-readable verdict over ``sums`` and its detached ``signature``; accepted only for a
    pinned fingerprint. ``what`` names the signed file in messages."""
    gpgv = require_tool("gpgv")
    with tempfile.TemporaryDirectory(prefix="cloudbake-gpgv-") as tmp:
        sums_file, sig_file = Path(tmp) / "signed", Path(tmp) / "signature.gpg"
        sums_file.write_bytes(sums)
        sig_file.write_bytes(dearmor(signature, f"{what}.gpg"))
        result = run([gpgv, "--homedir", tmp, "--status-fd", "1", "--keyring", keyring, sig_file, sums_file],
                     stage="fetch", timeout=60, check=False)
    return _verdict(result.stdout, result.returncode, keyring, fingerprints, what)


def check_clearsigned(message: bytes, keyring: Path, fingerprints: tuple[str, ...],
                      what: str) -> tuple[Signature, bytes]:
    """A clear-signed file's verdict and the text the signature covers, as gpgv writes it out.

    Only that text is returned: whatever a file holds around the signed part (lines before the
    armor, after the signature) is never read as if it were signed.
    """
    gpgv = require_tool("gpgv")
    with tempfile.TemporaryDirectory(prefix="cloudbake-gpgv-") as tmp:
        signed, out = Path(tmp) / "message.asc", Path(tmp) / "signed-text"
        signed.write_bytes(message)
        result = run([gpgv, "--homedir", tmp, "--status-fd", "1", "--keyring", keyring, "--output", out, signed],
                     stage="fetch", timeout=60, check=False)
        signature = _verdict(result.stdout, result.returncode, keyring, fingerprints, what)
        if not out.is_file():
            raise PipelineError(f"{what}: gpgv verified no clear-signed text", hint="the file is not clear-signed")
        return signature, out.read_bytes()


def _verdict(status_text: str, returncode: int, keyring: Path, fingerprints: tuple[str, ...],
             what: str) -> Signature:
    """The signature gpgv's status lines describe, refused unless valid, unrevoked and by a pinned key."""
    status = [line.split()[1:] for line in status_text.splitlines() if line.startswith("[GNUPG:] ")]
    status = [fields for fields in status if fields]
    valid = [fields for fields in status if fields[0] == "VALIDSIG"]
    refused = [fields for fields in status if fields[0] in SIGNATURE_REFUSALS]
    if refused:
        # gpgv can print VALIDSIG beside these (a revoked key's signature is cryptographically valid):
        # any of them refuses the signature.
        code = refused[0][0]
        reason = SIGNATURE_REFUSALS[code].replace("the signed file", what)
        if code == "ERRSIG" and any(fields[0] == "NO_PUBKEY" for fields in status):
            reason = "it was made by a key that is not in the keyring"
        raise PipelineError(f"{what} signature check failed: {reason} (gpgv: {code})",
                            hint=f"keyring used: {keyring}; the image was not downloaded")
    if returncode != 0 or not valid:
        codes = sorted({fields[0] for fields in status} - {"NEWSIG", "KEY_CONSIDERED"})
        if "NO_PUBKEY" in codes or "ERRSIG" in codes:
            reason = "it was made by a key that is not in the keyring"
        elif "BADSIG" in codes:
            reason = f"the signature does not match {what} (tampered or corrupted)"
        else:
            reason = f"gpgv said {', '.join(codes) or 'nothing'}"
        raise PipelineError(f"{what} signature check failed: {reason}",
                            hint=f"keyring used: {keyring}; the image was not downloaded")
    fields = valid[0]
    signer = fields[1].upper()
    primary = fields[10].upper() if len(fields) > 10 else signer
    if signer not in fingerprints and primary not in fingerprints:
        raise PipelineError(f"{what} is signed by {primary}, which is not in source.verify.fingerprints",
                            hint="add that fingerprint only if you trust its owner; the image was not downloaded")
    created = dt.datetime.fromtimestamp(int(fields[3]), dt.UTC).isoformat().replace("+00:00", "Z")
    return Signature(primary if primary in fingerprints else signer, created)
