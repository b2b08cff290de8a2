"""test-image and console: throwaway VMs of the baked image."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from doit import get_var

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths

from .context import Image, flag, per_image
from .doitutil import described, doit_action, engine
from .verbs import SUMMARIES


def warm_is_current(pipeline: Pipeline, paths: Paths) -> bool:
    from cloudbake.run.testrun import warm_is_current

    return warm_is_current(pipeline, paths)


def warm_action(pipeline: Pipeline, paths: Paths) -> None:
    """``doit warm``: save the warm set; with ``cache.push``, push it beside the image."""
    from cloudbake.run.testrun import run_warm

    warm = run_warm(pipeline, paths)
    if warm is not None and pipeline.remote is not None and pipeline.remote.push:
        from cloudbake.image.build import resolve_build
        from cloudbake.remote.warmshare import share_warm_sets

        share_warm_sets(pipeline, paths, resolve_build(pipeline, paths).published(paths))


def test_image_action(pipeline: Pipeline, paths: Paths, command: str = "", keep: bool = False, jobs: int = 0) -> None:
    """doit's test-image (its options are the task's params)."""
    from cloudbake.run.testrun import Keep, TestRequest, run_test_task

    run_test_task(pipeline, paths, TestRequest(command or None, jobs or None, Keep.always if keep else Keep.never))


def _warm_task(image: Image) -> dict[str, Any]:
    pipeline, paths = image.pipeline, image.paths
    return {
        "doc": SUMMARIES["warm"],
        "task_dep": [image.task("bake")],
        "actions": [(doit_action(warm_action), [pipeline, paths])],
        "uptodate": [described("the warm state of the image for this host is saved (or test.warm is false)",
                               lambda: warm_is_current(pipeline, paths))],
        "verbosity": 2,
    }


def task_warm() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("warm", _warm_task)


def _test_image_task(image: Image) -> dict[str, Any]:
    return {
        "basename": "test-image",
        "doc": SUMMARIES["test-image"],
        "params": [
            {"name": "command", "long": "cmd", "type": str, "default": str(get_var("cmd", "") or ""),
             "help": "command to run instead of test.command (cmd=... works too)"},
            {"name": "keep", "long": "keep", "type": bool, "default": flag(get_var("keep", "0")),
             "help": "keep the VM running afterwards, with its SSH command printed (keep=1 works too)"},
            {"name": "jobs", "short": "j", "long": "jobs", "type": int, "default": 0,
             "help": "VMs at once (default test.parallel)"},
        ],
        "task_dep": [image.task("bake")],
        "actions": [(doit_action(test_image_action), [image.pipeline, image.paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_test_image() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("test-image", _test_image_task)


def _console_task(image: Image) -> dict[str, Any]:
    return {
        "doc": SUMMARIES["console"],
        "task_dep": [image.task("bake")],
        "actions": [(doit_action(engine("cloudbake.run.testrun:run_console")), [image.pipeline, image.paths])],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_console() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("console", _console_task)
