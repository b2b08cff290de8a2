"""What an image file names besides itself, read from the qcow2 header before any tool opens it.

A qcow2 can name other files: a backing file (a path, or a ``json:``/``nbd:``/``http:``
name) or an external data file. An image that comes from outside (an upstream mirror, a
registry) and names one would make qemu-img or a test VM read a host file or connect
somewhere: the checksum proves only whose bytes they are, not that they are harmless. The
header is parsed here in Python first, so not even ``qemu-img info`` opens such a file.

Layout (QEMU's docs/interop/qcow2.txt, big-endian): magic ``QFI\\xfb``; version at 4;
backing file name offset at 8 (u64) and length at 16 (u32); cluster bits at 20; from
version 3, incompatible features at 72 (bit 2: external data file) and the header length
at 100; header extensions follow the header (version 2: at 72), each type (u32), length
(u32) and data padded to 8 bytes, ending with type 0; type ``0x44415441`` names the data file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cloudbake.core.errors import PipelineError

MAGIC = b"QFI\xfb"
EXTERNAL_DATA_FILE_BIT = 1 << 2
DATA_FILE_EXTENSION = 0x44415441
HEADER_READ_BYTES = 64 << 10
MAX_BACKING_NAME = 1023


def backing_name(header: bytes, where: str) -> str | None:
    """The backing file a qcow2 header names, or None; refuses what is not a sane qcow2 header."""
    if len(header) < 72 or header[:4] != MAGIC:
        raise PipelineError(f"{where}: not a qcow2 image (no QFI\\xfb magic)")
    version, offset, length = struct.unpack(">IQI", header[4:20])
    if version not in (2, 3):
        raise PipelineError(f"{where}: qcow2 version {version} is not one QEMU writes (2 or 3)")
    if offset == 0:
        return None
    if length == 0 or length > MAX_BACKING_NAME or offset + length > len(header):
        raise PipelineError(f"{where}: the qcow2 header's backing file name is malformed")
    return header[offset:offset + length].decode("utf-8", errors="replace")


def data_file_name(header: bytes, where: str) -> str | None:
    """The external data file a qcow2 header names (or flags), or None."""
    version = struct.unpack(">I", header[4:8])[0]
    if version >= 3:
        if len(header) < 104:
            raise PipelineError(f"{where}: the qcow2 version 3 header is cut short")
        incompatible = struct.unpack(">Q", header[72:80])[0]
        if incompatible & EXTERNAL_DATA_FILE_BIT:
            return "(flagged in the header's incompatible features)"
        start = struct.unpack(">I", header[100:104])[0]
    else:
        start = 72
    position = start
    while position + 8 <= len(header):
        kind, length = struct.unpack(">II", header[position:position + 8])
        if kind == 0:
            return None
        if kind == DATA_FILE_EXTENSION:
            return header[position + 8:position + 8 + length].decode("utf-8", errors="replace")
        position += 8 + ((length + 7) & ~7)
    return None


def check_standalone(image: Path, what: str, *, allowed_backing: str | None = None,
                     hint: str | None = None) -> None:
    """Refuse a qcow2 that names a backing file (other than ``allowed_backing``, a plain name) or a data file.

    ``what`` names the image in messages ("the pulled image"); ``allowed_backing`` is the one
    backing file name the caller expects (a layer's parent's published file by relative name, a
    warm set's disk's base image), never a name taken from the file itself.
    """
    try:
        with open(image, "rb") as f:
            header = f.read(HEADER_READ_BYTES)
    except OSError as err:
        raise PipelineError(f"{image.name}: cannot read {what} ({err.strerror or err})") from None
    where = f"{image.name} ({what})"
    backing = backing_name(header, where)
    if backing is not None and (allowed_backing is None or backing != allowed_backing or ":" in backing):
        raise PipelineError(f"{where} names a backing file ({backing[:200]!r}); refused, a VM of it would read "
                            "that file from this machine", hint=hint)
    data_file = data_file_name(header, where)
    if data_file is not None:
        raise PipelineError(f"{where} keeps its data in an external file ({data_file[:200]!r}); refused",
                            hint=hint)


def overlay_backing(base: Path, folder: Path) -> str:
    """The backing file name an overlay in ``folder`` gives ``base``: relative when ``folder`` lies below
    ``base``'s folder (the pair then moves as one, as a restored cache does), else absolute."""
    beside = base.parent.resolve() in folder.resolve().parents
    return os.path.relpath(base.resolve(), folder.resolve()) if beside else str(base.resolve())

