"""bake, cache-key, prune: the published image named by its key."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths

from .context import Image, per_image
from .doitutil import described, doit_action, engine
from .verbs import SUMMARIES


def bake_is_current(pipeline: Pipeline, paths: Paths) -> bool:
    """The image named by the current key is published and matches its manifest. No doit state needed,
    so a restored cache (``dist/`` alone) counts."""
    from cloudbake.core.errors import PipelineError
    from cloudbake.core.log import stage_logger
    from cloudbake.image.build import resolve_build
    from cloudbake.image.store import is_published, verify_chain

    try:
        image = resolve_build(pipeline, paths).published(paths)
    except PipelineError:
        return False  # let the action run and report the problem
    if not is_published(image):
        return False
    try:
        verify_chain(image)
    except PipelineError as err:
        stage_logger("bake").warning("%s; baking it again", err.message)
        return False
    return True


def always_execute_requested(argv: list[str]) -> bool:
    """Whether doit was told ``-a``/``--always-execute``.

    doit runs an action under -a but does not tell the action so; its command line is
    the only witness (the same for ``doit`` and the ``cloudbake`` command).
    """
    for arg in argv:
        if arg == "--always-execute" or (arg.startswith("-") and not arg.startswith("--") and "a" in arg[1:]
                                          and arg[1:].isalpha()):
            return True
    return False


def bake_action(pipeline: Pipeline, paths: Paths, force: bool = False) -> None:
    """Bake, or bake again when asked to (``-a`` or ``--force``).

    doit also runs this when a file it depends on looks changed (a restored CI cache has no
    doit state): then a published image for the current key is kept.
    """
    from cloudbake.image.bake import run_bake
    from cloudbake.remote.share import REGISTRY

    run_bake(pipeline, paths, force=force or always_execute_requested(sys.argv[1:]), shared=REGISTRY)


def not_forced(task: Any) -> bool:
    """``--force`` makes the task out of date: doit runs no action of a task it finds up to date."""
    return not (task.options or {}).get("force")  # doit info checks before options are parsed


def _bake_task(image: Image) -> dict[str, Any]:
    pipeline, paths = image.pipeline, image.paths
    parent = pipeline.parent
    return {
        "doc": SUMMARIES["bake"],
        # The lock (fetch's target) and the seed ISO (seed's target) make doit run both first. A
        # layered image's parent is baked first, when the image itself is not up to date (a
        # published self-contained child needs no parent).
        "file_dep": [str(paths.lock_file), str(paths.seed_iso)],
        "setup": [f"bake:{parent.name}"] if parent else [],  # a parent implies subtasks
        "params": [{"name": "force", "long": "force", "type": bool, "default": False,
                    "help": "bake again even when the image for the current key is published (like -a)"}],
        "actions": [(doit_action(bake_action), [pipeline, paths])],
        "uptodate": [described("the image named by the current key is published in the output folder and "
                               "matches the SHA-256 in its manifest", lambda: bake_is_current(pipeline, paths)),
                     not_forced],
        "clean": [(engine("cloudbake.image.bake:clean_bake"), [pipeline, paths])],
        "verbosity": 2,
    }


def task_bake() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("bake", _bake_task)


def _cache_key_task(image: Image) -> dict[str, Any]:
    return {
        "basename": "cache-key",
        "doc": SUMMARIES["cache-key"],
        "actions": [(doit_action(engine("cloudbake.image.build:run_cache_key")),
                     [image.pipeline, image.paths, image.several])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_cache_key() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("cache-key", _cache_key_task)


def _prune_task(image: Image) -> dict[str, Any]:
    return {
        "doc": SUMMARIES["prune"],
        "actions": [(doit_action(engine("cloudbake.image.store:run_prune")), [image.pipeline, image.paths])],
        "uptodate": [False],
    }


def task_prune() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("prune", _prune_task)
