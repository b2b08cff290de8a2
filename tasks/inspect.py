"""validate, status, prune-downloads: questions about the pipeline, the host and the caches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths

from .context import Image, current_images, per_image
from .doitutil import doit_action, engine
from .verbs import SUMMARIES


def status_action(pipeline: Pipeline, paths: Paths, as_json: bool = False) -> None:
    from cloudbake.image.inspect import run_status

    run_status(pipeline, paths, as_json)


def _validate_task(image: Image) -> dict[str, Any]:
    return {
        "doc": SUMMARIES["validate"],
        "actions": [(doit_action(engine("cloudbake.image.inspect:run_validate")), [image.pipeline, image.paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_validate() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("validate", _validate_task)


def _status_task(image: Image) -> dict[str, Any]:
    return {
        "doc": SUMMARIES["status"],
        "params": [{"name": "as_json", "long": "json", "type": bool, "default": False,
                    "help": "print JSON instead of text"}],
        "actions": [(doit_action(status_action), [image.pipeline, image.paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_status() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("status", _status_task)


def task_prune_downloads() -> dict[str, Any]:
    images = current_images()
    return {
        "basename": "prune-downloads",
        "doc": SUMMARIES["prune-downloads"],
        "actions": [(doit_action(engine("cloudbake.image.inspect:run_prune_downloads")),
                     [[(image.pipeline, image.paths) for image in images]])],
        "uptodate": [False],
    }
