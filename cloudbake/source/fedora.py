"""The Fedora cloud image source: the Cloud Base Generic images, and their clear-signed CHECKSUM.

Layout (https://download.fedoraproject.org/pub/fedora/linux/): ``releases/<N>/Cloud/<arch>/images/``
holds ``Fedora-Cloud-Base-Generic-<N>-<build>.<arch>.qcow2`` and
``Fedora-Cloud-<N>-<build>-<arch>-CHECKSUM``, clear-signed with the release's key. The signature
is checked by gpgv against the pinned fingerprint before a line of the file is read, and only the
text the signature covers is parsed; the newest build comes from the folder's listing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import requests

from cloudbake.config.model import Pipeline, SignaturePolicy, Source
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import age_s, write_atomically
from cloudbake.core.log import stage_logger, strip_credentials
from cloudbake.source.checksums import parse_bsd_sums
from cloudbake.source.download import Digest
from cloudbake.source.http import HttpSettings, fetch_small
from cloudbake.source.lock import Lock, lock_source
from cloudbake.source.openpgp import Signature, _fingerprints_or_none, check_clearsigned, dearmor_all

log = stage_logger("fetch")

# Every current Fedora key, armored (https://fedoraproject.org/security/).
KEYS_URL = "https://fedoraproject.org/fedora.gpg"
KEY_REFRESH_S = 7 * 24 * 3600     # as for Ubuntu's key: a revocation reaches this machine within a week
CHECKSUM_MAX_BYTES = 1 << 20
LISTING_MAX_BYTES = 4 << 20
KEYS_MAX_BYTES = 4 << 20
FEDORA_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Build:
    folder_url: str
    release: str
    build: str
    arch: str                # Fedora's name: x86_64, aarch64

    @property
    def image_name(self) -> str:
        return f"Fedora-Cloud-Base-Generic-{self.release}-{self.build}.{self.arch}.qcow2"

    @property
    def checksum_name(self) -> str:
        return f"Fedora-Cloud-{self.release}-{self.build}-{self.arch}-CHECKSUM"


BUILD_MAX_CHARS = 32
BUILD_PART_MAX_DIGITS = 9


def images_folder(source: Source) -> str:
    return f"{source.mirror}releases/{source.release}/Cloud/{FEDORA_ARCH[str(source.arch)]}/images/"


def newest_build(listing: str, release: str, arch: str) -> str | None:
    """The highest build a folder listing names a CHECKSUM for (``1.10`` is newer than ``1.9``)."""
    found: list[str] = re.findall(rf"Fedora-Cloud-{re.escape(release)}-(\d+(?:\.\d+)*)-{re.escape(arch)}-CHECKSUM",
                                  listing)
    # A build is a few short numbers; a hostile listing's 5,000-digit one would end int() in a ValueError.
    names = [build for build in found if len(build) <= BUILD_MAX_CHARS and
             all(len(part) <= BUILD_PART_MAX_DIGITS for part in build.split("."))]
    if not names:
        return None
    return max(names, key=lambda build: tuple(int(part) for part in build.split(".")))


def resolve_build(source: Source, session: requests.Session, http: HttpSettings) -> Build:
    folder, arch = images_folder(source), FEDORA_ARCH[str(source.arch)]
    if source.channel != "current":
        return Build(folder, source.release, source.channel, arch)
    listing = fetch_small(session, folder, LISTING_MAX_BYTES, http).decode("utf-8", errors="replace")
    build = newest_build(listing, source.release, arch)
    if build is None:
        raise PipelineError(f"{strip_credentials(folder)} lists no Fedora-Cloud-{source.release}-*-{arch}-CHECKSUM",
                            hint="check source.release and source.mirror, or name a build in source.channel")
    return Build(folder, source.release, build, arch)


def resolve_keyring(pipeline: Pipeline, paths: Paths, session: requests.Session, http: HttpSettings) -> Path:
    """source.verify.keyring; else Fedora's published keys, fetched over TLS, kept only when they hold a
    pinned fingerprint, and fetched again after a week so a revocation arrives."""
    verify = pipeline.source.verify
    if verify.keyring is not None:
        return _binary(dearmor_all(verify.keyring.read_bytes(), str(verify.keyring)), paths, "keyring")
    cached = paths.cache_dir / "keys" / "fedora.gpg"
    if cached.is_file() and set(verify.fingerprints) & set(_fingerprints_or_none(cached.read_bytes())) \
            and age_s(cached.stat().st_mtime) < KEY_REFRESH_S:
        return cached
    log.info("fetching Fedora's signing keys from %s", KEYS_URL)
    keys = dearmor_all(fetch_small(session, KEYS_URL, KEYS_MAX_BYTES, http), KEYS_URL)
    if not set(verify.fingerprints) & set(_fingerprints_or_none(keys)):
        raise PipelineError(f"{KEYS_URL} holds none of the pinned keys ({', '.join(verify.fingerprints)})",
                            hint="set source.verify.keyring to a keyring you trust")
    write_atomically(cached, keys)
    return cached


def _binary(keys: bytes, paths: Paths, name: str) -> Path:
    dest = paths.cache_dir / "keys" / f"{name}-{hashlib.sha256(keys).hexdigest()[:16]}.gpg"
    if not dest.is_file():
        write_atomically(dest, keys)
    return dest


def resolve_and_verify(pipeline: Pipeline, paths: Paths, session: requests.Session,
                       http: HttpSettings) -> tuple[Lock, Digest]:
    """The build, its CHECKSUM verified (signature first), the image's SHA-256 from the signed text."""
    source = pipeline.source
    build = resolve_build(source, session, http)
    checksum_url = build.folder_url + build.checksum_name
    log.info("resolving %s", build.folder_url + build.image_name)
    message = fetch_small(session, checksum_url, CHECKSUM_MAX_BYTES, http)
    signature: Signature | None = None
    if source.verify.signature is SignaturePolicy.off:
        log.warning("SIGNATURE CHECK OFF (source.verify.signature: off): %s is trusted as served; anyone who can "
                    "alter the mirror or the connection can alter the image", checksum_url)
        text = _cleartext(message)
    else:
        keyring = resolve_keyring(pipeline, paths, session, http)
        signature, signed = check_clearsigned(message, keyring, source.verify.fingerprints, build.checksum_name)
        log.info("%s signed by %s at %s", build.checksum_name, signature.fingerprint, signature.created)
        text = signed.decode("utf-8", errors="replace")
    entries = parse_bsd_sums(text, checksum_url)
    found = entries.get(build.image_name)
    if found is None or found[0] != "sha256":
        raise PipelineError(f"{checksum_url} has no SHA256 line for {build.image_name}",
                            hint=f"it lists: {', '.join(sorted(entries)[:8])}")
    sha256 = found[1]
    if source.verify.sha256 and source.verify.sha256 != sha256:
        raise PipelineError(f"source.verify.sha256 pins {source.verify.sha256} but {build.checksum_name} says "
                            f"{sha256} for {build.image_name}", hint="update the pin if the new image is expected")
    lock = Lock(source=lock_source(source), url=strip_credentials(build.folder_url + build.image_name),
                serial=build.build, sha256=sha256, size=-1,
                signed_by=signature.fingerprint if signature else None,
                signature_time=signature.created if signature else None)
    return lock, Digest("sha256", sha256)


def _cleartext(message: bytes) -> str:
    """The text of a clear-signed message without checking it (``signature: off``): dash-escaping undone."""
    text = message.decode("utf-8", errors="replace")
    if "-----BEGIN PGP SIGNED MESSAGE-----" not in text:
        return text
    body = text.split("-----BEGIN PGP SIGNED MESSAGE-----", 1)[1].split("\n\n", 1)[-1]
    body = body.split("-----BEGIN PGP SIGNATURE-----", 1)[0]
    return "\n".join(line[2:] if line.startswith("- ") else line for line in body.splitlines())
