"""The Ubuntu cloud image source: release names, the mirror's layout, SHA256SUMS and its signing key.

A second source (another distribution, a registry) goes in a module beside this one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import requests

from cloudbake.config.model import RELEASES, Pipeline, SignaturePolicy, Source
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import age_s, write_atomically
from cloudbake.core.log import stage_logger, strip_credentials
from cloudbake.source.checksums import parse_sums
from cloudbake.source.download import Digest
from cloudbake.source.http import HttpSettings, fetch_small
from cloudbake.source.lock import Lock, UpstreamFolder, lock_source
from cloudbake.source.openpgp import Signature, _fingerprints_or_none, check_signature, dearmor

log = stage_logger("fetch")


# Ubuntu releases cloud images are published for: version <-> codename.
SYSTEM_KEYRING = Path("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg")


KEYSERVER_URL = "https://keyserver.ubuntu.com/pks/lookup?op=get&options=mr&search=0x{fingerprint}"


SUMS_MAX_BYTES = 1 << 20


SIGNATURE_MAX_BYTES = 64 << 10


KEY_MAX_BYTES = 1 << 20


# A signing key fetched from the keyserver is fetched again after this long, so that its
# revocation reaches this machine (docs/threat-model.md).
KEY_REFRESH_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Upstream(UpstreamFolder):
    """Where the image and its checksums live, as resolved from ``source.*``."""

    @property
    def sums_url(self) -> str:
        return self.folder_url + "SHA256SUMS"

    @property
    def signature_url(self) -> str:
        return self.folder_url + "SHA256SUMS.gpg"


def resolve_release(release: str) -> tuple[str, str | None]:
    """(codename, version) for a codename or a version; the version is None for unknown codenames."""
    if release in RELEASES:
        return RELEASES[release], release
    by_codename = {codename: version for version, codename in RELEASES.items()}
    if release in by_codename:
        return release, by_codename[release]
    if re.fullmatch(r"\d{2}\.\d{2}", release):
        raise PipelineError(f"source.release: unknown Ubuntu version {release}",
                            hint=f"use its codename instead, or one of: {', '.join(RELEASES)}")
    return release, None


def resolve_upstream(source: Source) -> Upstream:
    """URLs in Ubuntu's layout for ``source.*`` (see docs/how-it-works.md)."""
    codename, version = resolve_release(source.release)
    arch = str(source.arch)
    channel = source.channel
    if channel == "current" or re.fullmatch(r"\d{8}(\.\d+)?", channel):
        serial = None if channel == "current" else channel
        return Upstream(f"{source.mirror}{codename}/{channel}/", f"{codename}-server-cloudimg-{arch}.img", serial)
    if version is None:
        raise PipelineError(f"source.channel: {channel} needs the release's version, and {codename!r} is not a "
                            "codename cloudbake knows", hint="set source.release to the version, e.g. 24.04")
    folder = "release" if channel == "release" else channel
    serial = None if channel == "release" else channel.removeprefix("release-")
    return Upstream(f"{source.mirror}releases/{version}/{folder}/", f"ubuntu-{version}-server-cloudimg-{arch}.img",
                    serial)


def resolve_keyring(pipeline: Pipeline, paths: Paths, session: requests.Session, http: HttpSettings) -> Path:
    """source.verify.keyring; else the system's Ubuntu keyring; else the pinned key from the keyserver."""
    verify = pipeline.source.verify
    if verify.keyring is not None:
        return _binary_keyring(verify.keyring.read_bytes(), paths, label=str(verify.keyring))
    if SYSTEM_KEYRING.is_file():
        return SYSTEM_KEYRING
    keys_dir = paths.cache_dir / "keys"
    stale: Path | None = None
    for fingerprint in verify.fingerprints:
        cached = keys_dir / f"{fingerprint}.gpg"
        if cached.is_file() and fingerprint in _fingerprints_or_none(cached.read_bytes()):
            if age_s(cached.stat().st_mtime) < KEY_REFRESH_S:
                return cached
            stale = stale or cached  # refreshed below, so that a revocation can arrive
    for fingerprint in verify.fingerprints:
        url = KEYSERVER_URL.format(fingerprint=fingerprint)
        log.info("fetching signing key %s from %s", fingerprint, url.split("/pks/")[0])
        try:
            key = dearmor(fetch_small(session, url, KEY_MAX_BYTES, http), url)
        except PipelineError as err:
            if stale is None:
                raise
            age_days = min(age_s(stale.stat().st_mtime), 1e9) / 86400
            log.warning("could not refresh signing key %s (%s); using the copy fetched %.0f days ago, so a "
                        "revocation published since then is not seen", fingerprint, err.message, age_days)
            return stale
        present = _fingerprints_or_none(key)
        if fingerprint not in present:
            raise PipelineError(f"the keyserver returned a key that is not {fingerprint}; refusing it",
                                hint="set source.verify.keyring to a keyring you trust")
        cached = keys_dir / f"{fingerprint}.gpg"
        write_atomically(cached, key)
        return cached
    raise PipelineError("no keyring for the signature check")  # unreachable: fingerprints has minItems 1


def _binary_keyring(data: bytes, paths: Paths, label: str) -> Path:
    binary = dearmor(data, label)
    if binary == data:
        return Path(label)
    dest = paths.cache_dir / "keys" / f"dearmored-{hashlib.sha256(binary).hexdigest()[:16]}.gpg"
    if not dest.is_file():
        write_atomically(dest, binary)
    return dest


def resolve_and_verify(pipeline: Pipeline, paths: Paths, session: requests.Session,
                       http: HttpSettings) -> tuple[Lock, Digest]:
    """Steps 1-3: checksums and signature; what to download and the SHA-256 its bytes must have, never
    touching the image (every source module has this signature: ``source.fetch.SOURCES``)."""
    source = pipeline.source
    upstream = resolve_upstream(source)
    log.info("resolving %s", upstream.image_url)
    sums = fetch_small(session, upstream.sums_url, SUMS_MAX_BYTES, http)
    signature: Signature | None = None
    if source.verify.signature is SignaturePolicy.off:
        log.warning("SIGNATURE CHECK OFF (source.verify.signature: off): SHA256SUMS from %s is trusted as served; "
                    "anyone who can alter the mirror or the connection can alter the image", upstream.sums_url)
    else:
        sig = fetch_small(session, upstream.signature_url, SIGNATURE_MAX_BYTES, http)
        keyring = resolve_keyring(pipeline, paths, session, http)
        signature = check_signature(sums, sig, keyring, source.verify.fingerprints)
        log.info("SHA256SUMS signed by %s at %s", signature.fingerprint, signature.created)
    entries = parse_sums(sums.decode("utf-8", errors="replace"), upstream.sums_url)
    if upstream.image_name not in entries:
        raise PipelineError(f"{upstream.sums_url} has no entry for {upstream.image_name}",
                            hint=f"it lists: {', '.join(sorted(entries)[:8])}")
    sha256 = entries[upstream.image_name]
    if source.verify.sha256 and source.verify.sha256 != sha256:
        raise PipelineError(f"source.verify.sha256 pins {source.verify.sha256} but SHA256SUMS says {sha256} for "
                            f"{upstream.image_name}", hint="update the pin if the new image is expected")
    serial = upstream.serial or _build_serial(session, upstream, http)
    lock = Lock(source=lock_source(source), url=strip_credentials(upstream.image_url), serial=serial,
                sha256=sha256, size=-1, signed_by=signature.fingerprint if signature else None,
                signature_time=signature.created if signature else None)
    return lock, Digest("sha256", sha256)


def _build_serial(session: requests.Session, upstream: Upstream, http: HttpSettings) -> str | None:
    """The serial of a floating folder, from unpacked/build-info.txt when the mirror has it."""
    try:
        info = fetch_small(session, upstream.folder_url + "unpacked/build-info.txt", 64 << 10,
                           HttpSettings(http.connect_timeout_s, http.read_timeout_s, attempts=1))
    except PipelineError:
        return None
    match = re.search(r"^serial=(\S+)$", info.decode(errors="replace"), re.MULTILINE)
    return match.group(1) if match else None
