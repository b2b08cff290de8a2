"""The registry cache as the bake and the tasks use it: pull before a bake, push after, doit push and pull.

The glue above registry.py (images) and warmshare.py (their warm sets), so neither of those
imports the other's callers: an image pulled before a bake brings its warm set for this host,
and a push sends the warm sets beside the image.
"""

from __future__ import annotations

from pathlib import Path

from cloudbake.config.model import Pipeline, RemoteCache
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.image.store import is_published
from cloudbake.remote.registry import pull_image, push_image, try_pull
from cloudbake.remote.warmshare import share_warm_sets, try_pull_warm_set

log = stage_logger("registry")


# Pulls tried in this process: `doit bake` reaches the pull from both fetch and bake, and a
# registry that is down should cost one warning (and one round of retries), not two.
_tried: set[tuple[str, str]] = set()


def pull_before_bake(pipeline: Pipeline, paths: Paths, key: str) -> Path | None:
    """With ``cache.remote``, the image for ``key`` from the registry, or None (then the caller bakes)."""
    remote = pipeline.remote
    if remote is None or (remote.url, key) in _tried:
        return None
    _tried.add((remote.url, key))
    pulled = try_pull(remote, paths, pipeline.name, key)
    if pulled is not None:
        try_pull_warm_set(pipeline, paths, pulled)
    return pulled


def share_after_bake(pipeline: Pipeline, image: Path) -> None:
    """With ``cache.push`` (or ``CLOUDBAKE_PUSH=1``), push what was just baked; a failure is a warning."""
    remote = pipeline.remote
    if remote is None or not remote.push:
        return
    try:
        push_image(remote, image, pipeline_dir=pipeline.file.parent)
    except PipelineError as err:
        log.warning("baked, but the push to %s failed: %s", remote.url, err.message)


class RegistryCache:
    """``cache.remote`` as the bake's shared cache (``cloudbake.image.bake.SharedCache``)."""

    def pull(self, pipeline: Pipeline, paths: Paths, key: str) -> Path | None:
        return pull_before_bake(pipeline, paths, key)

    def push(self, pipeline: Pipeline, image: Path) -> None:
        share_after_bake(pipeline, image)


REGISTRY = RegistryCache()


def require_remote(pipeline: Pipeline) -> RemoteCache:
    if pipeline.remote is None:
        raise PipelineError(f"{pipeline.file.name} sets no cache.remote",
                            hint="add cache: {remote: oci://REGISTRY/REPOSITORY} to the pipeline")
    return pipeline.remote


def run_push(pipeline: Pipeline, paths: Paths) -> None:
    """``doit push``: the published image for the current key, to ``cache.remote``."""
    from cloudbake.image.build import resolve_build

    remote = require_remote(pipeline)
    image = resolve_build(pipeline, paths).published(paths)
    if not is_published(image):
        raise PipelineError(f"{image.name} is not baked yet", hint="cloudbake bake, then cloudbake push")
    if pipeline.is_layer and pipeline.parent is not None:  # (a layer has a parent; mypy cannot see it)
        # `doit push` of a file pushes what can be shared, and says what it leaves out.
        log.warning("not pushing %s: it is a layer over %s (disk.flatten: false); set disk.flatten: true to "
                    "share it", image.name, pipeline.parent.name)
        return
    push_image(remote, image, pipeline_dir=pipeline.file.parent)
    share_warm_sets(pipeline, paths, image)


def run_pull(pipeline: Pipeline, paths: Paths) -> None:
    """``doit pull``: the image for the current key from ``cache.remote``; a miss is an error here."""
    from cloudbake.image.build import resolve_build

    remote = require_remote(pipeline)
    key = resolve_build(pipeline, paths).key
    if pipeline.is_layer and pipeline.parent is not None:
        raise PipelineError(f"{pipeline.name} is published as a layer over {pipeline.parent.name} (disk.flatten: "
                            "false), and the registry holds self-contained images only",
                            hint="cloudbake bake builds it from its parent; set disk.flatten: true to share it")
    pulled = pull_image(remote, paths, pipeline.name, key)
    if pulled is None:
        raise PipelineError(f"{remote.url}:{key} is not in the registry",
                            hint="bake it (cloudbake bake) and push it (cloudbake push), or let a CI job with "
                                 "cache.push bake it")
    try_pull_warm_set(pipeline, paths, pulled)
