"""fetch and update: resolve, verify and download the upstream image; pin it in the lock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from doit import get_var

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError

from .context import Image, flag, per_image
from .doitutil import described, doit_action, engine
from .verbs import SUMMARIES


def fetch_is_current(pipeline: Pipeline, paths: Paths) -> bool:
    """Nothing to fetch: the lock's image is cached and verified, or the bake it feeds is already published
    (a restored CI cache needs no download)."""
    from cloudbake.image.build import resolve_build
    from cloudbake.image.store import is_published
    from cloudbake.source.fetch import cached_upstream

    if cached_upstream(pipeline, paths) is not None:
        return True
    try:
        return is_published(resolve_build(pipeline, paths).published(paths))
    except PipelineError:
        return False


def fetch_action(pipeline: Pipeline, paths: Paths) -> None:
    """Fetch unless nothing needs it (doit also runs this when only its file_dep looks changed)."""
    from cloudbake.core.log import stage_logger
    from cloudbake.image.build import resolve_build
    from cloudbake.remote.share import pull_before_bake
    from cloudbake.source.fetch import cached_upstream, run_fetch

    log = stage_logger("fetch")
    if fetch_is_current(pipeline, paths):
        log.info("nothing to fetch: %s", "the pinned image is cached" if cached_upstream(pipeline, paths)
                 else "the image baked from it is published")
        return
    # With a remote cache, the baked image may be a pull away: then the upstream image is never needed.
    remote = pipeline.remote
    if remote and paths.lock_file.exists() and pull_before_bake(pipeline, paths, resolve_build(pipeline, paths).key):
        log.info("nothing to fetch: the image baked from it was pulled from %s", remote.url)
        return
    run_fetch(pipeline, paths)


def _pins_upstream(image: Image) -> bool:
    return image.pipeline.parent is None  # a layered image starts from its parent's, not the upstream image


def _fetch_task(image: Image) -> dict[str, Any]:
    pipeline, paths = image.pipeline, image.paths
    return {
        "doc": SUMMARIES["fetch"],
        "file_dep": [str(pipeline.file)],
        "targets": [str(paths.lock_file)],
        "actions": [(doit_action(fetch_action), [pipeline, paths])],
        "uptodate": [described("the image pinned by the lock is in the download cache, verified, or the image "
                               "baked from it is already published", lambda: fetch_is_current(pipeline, paths))],
        "verbosity": 2,
    }


def task_fetch() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("fetch", _fetch_task, only=_pins_upstream)


def _update_task(image: Image) -> dict[str, Any]:
    return {
        "doc": SUMMARIES["update"],
        "actions": [(doit_action(engine("cloudbake.source.fetch:run_update")),
                     [image.pipeline, image.paths, flag(get_var("downgrade", "0"))])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_update() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("update", _update_task, only=_pins_upstream)
