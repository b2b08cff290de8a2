"""validate, status, prune-downloads: questions about the pipeline, the host and the caches."""

from __future__ import annotations

from typing import Any

from cloudbake.inspect import run_prune_downloads, run_status, run_validate

from .context import current
from .doitutil import doit_action


def task_validate() -> dict[str, Any]:
    pipeline, paths = current()
    return {
        "doc": "Check the pipeline, the user-data, the lock and the host (QEMU, firmware, accelerator, disk)",
        "actions": [(doit_action(run_validate), [pipeline, paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_status() -> dict[str, Any]:
    pipeline, paths = current()
    return {
        "doc": "Show the key, the lock, whether the image is baked, cache sizes and the accelerator (--json)",
        "params": [{"name": "as_json", "long": "json", "type": bool, "default": False,
                    "help": "print JSON instead of text"}],
        "actions": [(doit_action(run_status), [pipeline, paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_prune_downloads() -> dict[str, Any]:
    pipeline, paths = current()
    return {
        "basename": "prune-downloads",
        "doc": "Delete downloaded upstream images other than the one the lock pins",
        "actions": [(doit_action(run_prune_downloads), [pipeline, paths])],
        "uptodate": [False],
    }
