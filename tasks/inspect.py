"""validate, status, prune-downloads: questions about the pipeline, the host and the caches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cloudbake.inspect import run_prune_downloads, run_status, run_validate

from .context import Image, current_images, per_image
from .doitutil import doit_action


def task_validate() -> dict[str, Any] | Iterator[dict[str, Any]]:
    def make(image: Image) -> dict[str, Any]:
        return {
            "doc": "Check the pipeline, the user-data, the lock and the host (QEMU, firmware, accelerator, disk)",
            "actions": [(doit_action(run_validate), [image.pipeline, image.paths])],
            "uptodate": [False],
            "verbosity": 2,
        }
    return per_image("validate", make)


def task_status() -> dict[str, Any] | Iterator[dict[str, Any]]:
    def make(image: Image) -> dict[str, Any]:
        return {
            "doc": "Show the key, the lock, whether the image is baked, cache sizes and the accelerator (--json)",
            "params": [{"name": "as_json", "long": "json", "type": bool, "default": False,
                        "help": "print JSON instead of text"}],
            "actions": [(doit_action(run_status), [image.pipeline, image.paths])],
            "uptodate": [False],
            "verbosity": 2,
        }
    return per_image("status", make)


def task_prune_downloads() -> dict[str, Any]:
    images = current_images()
    return {
        "basename": "prune-downloads",
        "doc": "Delete downloaded upstream images other than the ones the lock files pin",
        "actions": [(doit_action(run_prune_downloads), [[(image.pipeline, image.paths) for image in images]])],
        "uptodate": [False],
    }
