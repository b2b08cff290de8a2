"""push and pull: the baked image for the current key, to and from the OCI registry in cache.remote."""

from __future__ import annotations

from typing import Any

from cloudbake.registry import run_pull, run_push

from .bake import bake_is_current
from .context import current
from .doitutil import described, doit_action


def task_push() -> dict[str, Any]:
    pipeline, paths = current()
    return {
        "doc": "Push the baked image for the current key to cache.remote (blobs the registry has are skipped)",
        "task_dep": ["bake"],
        "actions": [(doit_action(run_push), [pipeline, paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_pull() -> dict[str, Any]:
    pipeline, paths = current()
    return {
        "doc": "Pull the image for the current key from cache.remote into the output folder (no bake)",
        "actions": [(doit_action(run_pull), [pipeline, paths])],
        "uptodate": [described("the image named by the current key is published in the output folder and "
                               "matches the SHA-256 in its manifest", lambda: bake_is_current(pipeline, paths))],
        "verbosity": 2,
    }
