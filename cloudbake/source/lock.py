"""The lock file: what `doit fetch` pinned (URL, digest, size, serial, signer), read and written as checked values."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudbake.config.distros import facts
from cloudbake.config.model import Source
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import write_atomically
from cloudbake.core.log import strip_credentials

LOCK_VERSION = 1


@dataclass(frozen=True)
class UpstreamFolder:
    """Where an upstream image lives: its folder on the mirror, its name there, and its build when the
    folder is a dated one (each distribution's module resolves it from ``source.*``)."""

    folder_url: str
    image_name: str
    serial: str | None

    @property
    def image_url(self) -> str:
        return self.folder_url + self.image_name


@dataclass(frozen=True)
class Lock:
    """What ``pipeline.lock`` pins: enough to fetch and verify the same bytes again, offline-checkable."""

    source: dict[str, str]
    url: str
    serial: str | None
    sha256: str
    size: int
    signed_by: str | None
    signature_time: str | None

    def matches(self, source: Source) -> bool:
        return self.source == lock_source(source)


def lock_source(source: Source) -> dict[str, str]:
    """What the lock records of the source; the mirror without credentials (they stay in the pipeline)."""
    # Ubuntu's locks predate the distro field: they stay as they are, so existing locks still match.
    distro = {"distro": str(source.distro)} if facts(source.distro).named_in_key else {}
    return {**distro, "release": source.release, "arch": str(source.arch), "channel": source.channel,
            "mirror": strip_credentials(source.mirror)}


def with_mirror_credentials(url: str, mirror: str) -> str:
    """A URL read back from the lock, with the pipeline mirror's credentials when it is on that mirror."""
    plain_mirror = strip_credentials(mirror)
    if plain_mirror != mirror and url.startswith(plain_mirror):
        return mirror + url[len(plain_mirror):]
    return url


def read_lock(file: Path) -> Lock | None:
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
        if data.get("cloudbake_lock") != LOCK_VERSION:
            raise ValueError(f"unknown lock version {data.get('cloudbake_lock')!r}")
        lock = Lock(source=data["source"], url=data["url"], serial=data["serial"], sha256=data["sha256"],
                    size=data["size"], signed_by=data["signed_by"], signature_time=data["signature_time"])
        _check_lock_values(lock)
        return lock
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{file}: not a valid cloudbake lock file ({err})",
                            hint="delete it and run cloudbake update to write it again") from None


def _check_lock_values(lock: Lock) -> None:
    """A lock is input like any other: its digest names a file in the cache, its URL is fetched."""
    if not isinstance(lock.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", lock.sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, not {lock.sha256!r}")
    if not isinstance(lock.url, str) or not lock.url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"url must be an http(s):// or file:// URL, not {lock.url!r}")
    if not isinstance(lock.size, int) or isinstance(lock.size, bool) or lock.size < -1:
        raise ValueError(f"size must be a number of bytes, not {lock.size!r}")
    if not isinstance(lock.source, dict) or not all(isinstance(v, str) for v in lock.source.values()):
        raise ValueError("source must be a mapping of strings")
    for name in ("serial", "signed_by", "signature_time"):
        value = getattr(lock, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or null, not {value!r}")


def write_lock(file: Path, lock: Lock) -> None:
    data = {"cloudbake_lock": LOCK_VERSION, **asdict(lock)}
    write_atomically(file, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _serial_order(serial: str | None) -> tuple[int, ...] | None:
    """A serial as numbers to compare: Ubuntu's ``20261128`` or ``20261128.1``, Fedora's ``1.10``, Debian's
    ``20250814-2204`` (date, then time); None for anything else."""
    if serial is None or len(serial) > 40 or not re.fullmatch(r"\d+(?:[.-]\d+)*", serial):
        return None
    return tuple(int(part) for part in re.split(r"[.-]", serial))


def check_not_older(pinned: Lock | None, resolved: Lock, allow_downgrade: bool) -> None:
    """Refuse a signed set older than the pinned one (a mirror replaying an old, signed release).

    Serial and signature time are compared where both sides have them; either going
    backwards refuses, unless the user asked for the downgrade explicitly.
    """
    if pinned is None or allow_downgrade or pinned.source != resolved.source:
        return
    old_serial, new_serial = _serial_order(pinned.serial), _serial_order(resolved.serial)
    older_serial = old_serial is not None and new_serial is not None and new_serial < old_serial
    older_signature = bool(pinned.signature_time and resolved.signature_time
                           and resolved.signature_time < pinned.signature_time)
    if older_serial or older_signature:
        raise PipelineError(
            f"the mirror now offers an older image than the one pinned: serial {resolved.serial} signed "
            f"{resolved.signature_time or 'unsigned'}, pinned serial {pinned.serial} signed "
            f"{pinned.signature_time or 'unsigned'}; the lock was left as it is",
            hint="a mirror serving an old signed release can be a replay attack; if you really want the older "
                 "image, run cloudbake update --downgrade")
