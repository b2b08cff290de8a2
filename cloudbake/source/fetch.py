"""fetch: the verified upstream image in the cache, and the lock that pins it.

Order matters for security: the distribution's checksums are fetched and verified first, its own
way (``ubuntu``: SHA256SUMS and its detached signature; ``fedora``: the clear-signed CHECKSUM;
``debian``: SHA512SUMS, which nothing signs, as the pipeline must say); the image is requested
only once its digest is known, and it is renamed into the cache only when its bytes match
(``download``). The lock (``lock``) pins the SHA-256 of what was verified.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import requests

from cloudbake.config.model import Distro, Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import is_verified, record_verified, sha256_file, verified_record, verified_sha256
from cloudbake.core.log import stage_logger
from cloudbake.source import debian, fedora, ubuntu
from cloudbake.source.download import Digest, download
from cloudbake.source.http import HttpSettings, make_session
from cloudbake.source.lock import Lock, check_not_older, lock_source, read_lock, with_mirror_credentials, write_lock

log = stage_logger("fetch")


# Each distribution's layout and verification, one module each, all with the same signature.
Resolver = Callable[[Pipeline, Paths, requests.Session, HttpSettings], tuple[Lock, Digest]]
SOURCES: dict[Distro, Resolver] = {
    Distro.ubuntu: ubuntu.resolve_and_verify,
    Distro.debian: debian.resolve_and_verify,
    Distro.fedora: fedora.resolve_and_verify,
}


def cached_image_path(paths: Paths, sha256: str, name: str) -> Path:
    """Downloads are named by digest: a pinned digest finds its file without the network."""
    return paths.images_cache / f"{sha256[:16]}-{name}"


def ensure_image(pipeline: Pipeline, paths: Paths, *, update: bool = False, allow_downgrade: bool = False,
                 http: HttpSettings | None = None) -> tuple[Path, Lock]:
    """The verified upstream image in the cache, and the lock that pins it (written when new).


    With a matching lock and the image cached, no network is used. ``update``
    re-resolves even when a lock exists.
    """
    http = http or HttpSettings()
    lock = read_lock(paths.lock_file)
    if lock is not None and not lock.matches(pipeline.source) and not update:
        raise PipelineError(f"{paths.lock_file} pins {lock.source} but the pipeline's source is now "
                            f"{lock_source(pipeline.source)}", hint="run cloudbake update to resolve and pin it again")
    if lock is not None and not update:
        name = Path(urllib.parse.urlparse(lock.url).path).name
        image = cached_image_path(paths, lock.sha256, name)
        if is_verified(image, lock.sha256):
            log.info("cached: %s (pinned by %s)", image, paths.lock_file.name)
            return image, lock
        log.info("downloading the image pinned by %s", paths.lock_file.name)
        with make_session() as session:
            try:
                download(session, with_mirror_credentials(lock.url, pipeline.source.mirror), image, lock.sha256,
                         http, expected_size=lock.size if lock.size > 0 else None)
            except PipelineError as err:
                if "mismatch" in err.message:
                    raise PipelineError(f"{lock.url} no longer serves the image pinned by {paths.lock_file} "
                                        f"(sha256 {lock.sha256})",
                                        hint="run cloudbake update to pin the current image") from None
                raise
        return image, lock
    with make_session() as session:
        resolved, digest = resolve_and_verify(pipeline, paths, session, http)
        check_not_older(lock, resolved, allow_downgrade)
        image = _download_verified(session, pipeline, paths, resolved, digest, http)
    sha256 = verified_sha256(image) or sha256_file(image)
    if pipeline.source.verify.sha256 and pipeline.source.verify.sha256 != sha256:
        raise PipelineError(f"source.verify.sha256 pins {pipeline.source.verify.sha256} but the image that matched "
                            f"the {digest.algorithm.upper()} checksums is {sha256}",
                            hint="update the pin if the new image is expected")
    resolved = Lock(**{**asdict(resolved), "sha256": sha256, "size": image.stat().st_size})
    if lock != resolved:
        write_lock(paths.lock_file, resolved)
        log.info("pinned %s (sha256 %s…%s) in %s", resolved.url, resolved.sha256[:12],
                 f", serial {resolved.serial}" if resolved.serial else "", paths.lock_file)
    return image, resolved


def resolve_and_verify(pipeline: Pipeline, paths: Paths, session: requests.Session,
                       http: HttpSettings) -> tuple[Lock, Digest]:
    """What to download and the digest its bytes must have, from the distribution's own checksums (verified
    its own way); the lock's SHA-256 is that of the bytes (for Debian, known once they match SHA-512)."""
    return SOURCES[pipeline.source.distro](pipeline, paths, session, http)


def _download_verified(session: requests.Session, pipeline: Pipeline, paths: Paths, resolved: Lock, digest: Digest,
                       http: HttpSettings) -> Path:
    """The image in the download cache, named by its SHA-256: checked against ``digest`` as it arrives,
    staged under the publisher's digest first when that is another algorithm."""
    url = with_mirror_credentials(resolved.url, pipeline.source.mirror)
    name = Path(urllib.parse.urlparse(resolved.url).path).name
    if digest.algorithm == "sha256":
        return download(session, url, cached_image_path(paths, digest.hexdigest, name), digest, http)
    staged = paths.images_cache / f"{digest.algorithm}-{digest.hexdigest[:16]}-{name}"
    download(session, url, staged, digest, http)
    sha256 = verified_sha256(staged) or sha256_file(staged)
    image = cached_image_path(paths, sha256, name)
    os.replace(staged, image)
    verified_record(staged).unlink(missing_ok=True)
    record_verified(image, sha256)
    return image


def cached_upstream(pipeline: Pipeline, paths: Paths) -> Path | None:
    """The verified upstream image the lock pins, if it is in the cache; no network. Errors mean None."""
    try:
        lock = read_lock(paths.lock_file)
    except PipelineError:
        return None
    if lock is None or not lock.matches(pipeline.source):
        return None
    image = cached_image_path(paths, lock.sha256, Path(urllib.parse.urlparse(lock.url).path).name)
    return image if is_verified(image, lock.sha256) else None


def run_fetch(pipeline: Pipeline, paths: Paths) -> None:
    ensure_image(pipeline, paths)


def run_update(pipeline: Pipeline, paths: Paths, allow_downgrade: bool = False) -> None:
    ensure_image(pipeline, paths, update=True, allow_downgrade=allow_downgrade)
