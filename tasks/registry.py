"""push and pull: the baked image for the current key, to and from the OCI registry in cache.remote."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .bake import bake_is_current
from .context import Image, per_image
from .doitutil import described, doit_action, engine
from .verbs import SUMMARIES


def _push_task(image: Image) -> dict[str, Any]:
    return {
        "doc": SUMMARIES["push"],
        "task_dep": [image.task("bake")],
        "actions": [(doit_action(engine("cloudbake.remote.share:run_push")), [image.pipeline, image.paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_push() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("push", _push_task)


def _pull_task(image: Image) -> dict[str, Any]:
    pipeline, paths = image.pipeline, image.paths
    return {
        "doc": SUMMARIES["pull"],
        "actions": [(doit_action(engine("cloudbake.remote.share:run_pull")), [pipeline, paths])],
        "uptodate": [described("the image named by the current key is published in the output folder and "
                               "matches the SHA-256 in its manifest", lambda: bake_is_current(pipeline, paths))],
        "verbosity": 2,
    }


def task_pull() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("pull", _pull_task)
