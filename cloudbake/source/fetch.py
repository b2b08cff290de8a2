"""fetch: the verified upstream image in the cache, and the lock that pins it.

Order matters for security: SHA256SUMS and its signature are fetched and checked first
(cloudbake.source.ubuntu, cloudbake.source.openpgp); the image is requested only once the expected digest
is known from a signature we trust, and it is renamed into the cache only when its bytes
match (cloudbake.source.http). The lock (cloudbake.source.lock) pins what was verified.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import asdict
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import is_verified
from cloudbake.core.log import stage_logger
from cloudbake.source.download import download
from cloudbake.source.http import HttpSettings, make_session
from cloudbake.source.lock import Lock, check_not_older, lock_source, read_lock, with_mirror_credentials, write_lock
from cloudbake.source.ubuntu import resolve_and_verify, resolve_upstream

log = stage_logger("fetch")


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
                            f"{lock_source(pipeline.source)}", hint="run doit update to resolve and pin it again")
    name = Path(urllib.parse.urlparse(lock.url if lock and not update else resolve_upstream(pipeline.source)
                                      .image_url).path).name
    if lock is not None and not update:
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
                                        f"(sha256 {lock.sha256})", hint="run doit update to pin the current image") \
                        from None
                raise
        return image, lock
    with make_session() as session:
        resolved = resolve_and_verify(pipeline, paths, session, http)
        check_not_older(lock, resolved, allow_downgrade)
        upstream_url = with_mirror_credentials(resolved.url, pipeline.source.mirror)
        image = cached_image_path(paths, resolved.sha256, name)
        download(session, upstream_url, image, resolved.sha256, http)
    resolved = Lock(**{**asdict(resolved), "size": image.stat().st_size})
    if lock != resolved:
        write_lock(paths.lock_file, resolved)
        log.info("pinned %s (sha256 %s…, serial %s) in %s", resolved.url, resolved.sha256[:12], resolved.serial,
                 paths.lock_file)
    return image, resolved


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
