"""The Debian cloud image source: cloud.debian.org's layout, and its SHA512SUMS, which Debian does not sign.

Layout (https://cloud.debian.org/images/cloud/): ``<codename>/latest/`` holds the newest build and
``<codename>/<YYYYMMDD-NNNN>/`` each dated one; the image is
``debian-<version>-genericcloud-<arch>[-<build>].qcow2`` beside ``SHA512SUMS`` and a per-image
JSON manifest. Nothing is signed: the pipeline must say ``verify.signature: none``, the sums are
trusted as served over TLS (or from this machine), and the lock pins the SHA-256 of the bytes
that matched them, so only ``doit update`` moves it (docs/threat-model.md).
"""

from __future__ import annotations

import json
import re
import urllib.parse

import requests

from cloudbake.config.distros import codename_and_version
from cloudbake.config.model import Distro, Pipeline, Source
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger, strip_credentials
from cloudbake.source.checksums import parse_sums
from cloudbake.source.download import Digest
from cloudbake.source.http import HttpSettings, fetch_small
from cloudbake.source.lock import Lock, UpstreamFolder, lock_source

log = stage_logger("fetch")

SUMS_MAX_BYTES = 1 << 20
MANIFEST_MAX_BYTES = 1 << 20
BUILD = re.compile(r"\b(\d{8}-\d{4})\b")


def resolve_upstream(source: Source) -> UpstreamFolder:
    """URLs in cloud.debian.org's layout for ``source.*``."""
    codename, version = codename_and_version(Distro.debian, source.release)
    stem = f"debian-{version}-genericcloud-{source.arch}"
    if source.channel == "current":
        return UpstreamFolder(f"{source.mirror}{codename}/latest/", f"{stem}.qcow2", None)
    return UpstreamFolder(f"{source.mirror}{codename}/{source.channel}/", f"{stem}-{source.channel}.qcow2",
                          source.channel)


def check_transport(mirror: str) -> None:
    """Unsigned sums are only as good as the channel they came over: TLS, this machine, or loopback."""
    parts = urllib.parse.urlparse(mirror)
    host = (parts.hostname or "").lower()
    if parts.scheme == "http" and host not in ("localhost", "127.0.0.1", "::1"):
        raise PipelineError(f"source.mirror {strip_credentials(mirror)} is plain HTTP, and Debian signs nothing: "
                            "the checksums would be trusted as anyone on the way served them",
                            hint="use the mirror's https:// URL")


def resolve_and_verify(pipeline: Pipeline, paths: Paths, session: requests.Session,
                       http: HttpSettings) -> tuple[Lock, Digest]:
    """SHA512SUMS of the build's folder, and the image's entry in it; the image is never touched here.

    The lock's SHA-256 is filled in by the fetch, from the bytes that matched the SHA-512.
    """
    source = pipeline.source
    check_transport(source.mirror)
    upstream = resolve_upstream(source)
    sums_url = upstream.folder_url + "SHA512SUMS"
    log.info("resolving %s", upstream.image_url)
    sums = fetch_small(session, sums_url, SUMS_MAX_BYTES, http)
    log.info("Debian signs no checksums (source.verify.signature: none): trusting SHA512SUMS as served by %s; "
             "the lock pins what matched it", strip_credentials(upstream.folder_url))
    entries = parse_sums(sums.decode("utf-8", errors="replace"), sums_url, "sha512")
    if upstream.image_name not in entries:
        raise PipelineError(f"{sums_url} has no entry for {upstream.image_name}",
                            hint=f"it lists: {', '.join(sorted(entries)[:8])}")
    serial = upstream.serial or _build_of_latest(session, upstream, http)
    lock = Lock(source=lock_source(source), url=strip_credentials(upstream.image_url), serial=serial, sha256="",
                size=-1, signed_by=None, signature_time=None)
    return lock, Digest("sha512", entries[upstream.image_name])


def _build_of_latest(session: requests.Session, upstream: UpstreamFolder, http: HttpSettings) -> str | None:
    """The dated build ``latest/`` stands for, from the image's JSON manifest when the mirror has it."""
    url = upstream.folder_url + upstream.image_name.removesuffix(".qcow2") + ".json"
    try:
        text = fetch_small(session, url, MANIFEST_MAX_BYTES,
                           HttpSettings(http.connect_timeout_s, http.read_timeout_s, attempts=1))
    except PipelineError:
        return None
    return build_from_manifest(text)


def build_from_manifest(text: bytes) -> str | None:
    """The build id the image's JSON manifest names in its ``cloud.debian.org/version`` label; never the
    first date-like string anywhere in the file (a description or a package version can hold one)."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    items = document.get("items") if isinstance(document, dict) else None
    for item in items if isinstance(items, list) else []:
        labels = ((item or {}).get("metadata") or {}).get("labels") if isinstance(item, dict) else None
        version = labels.get("cloud.debian.org/version") if isinstance(labels, dict) else None
        if isinstance(version, str) and BUILD.fullmatch(version):
            return version
    return None
