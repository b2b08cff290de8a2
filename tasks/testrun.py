"""test-image and console: throwaway VMs of the baked image."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from doit import get_var

from cloudbake.testrun import run_console, run_test_task, run_warm, warm_is_current

from .context import Image, flag, per_image
from .doitutil import described, doit_action


def task_warm() -> dict[str, Any] | Iterator[dict[str, Any]]:
    def make(image: Image) -> dict[str, Any]:
        pipeline, paths = image.pipeline, image.paths
        return {
            "doc": "Save the baked image's warm state for this host (one boot), so test runs resume it; "
                   "run it before CI saves its cache",
            "task_dep": [image.task("bake")],
            "actions": [(doit_action(run_warm), [pipeline, paths])],
            "uptodate": [described("the warm state of the image for this host is saved (or test.warm is false)",
                                   lambda: warm_is_current(pipeline, paths))],
            "verbosity": 2,
        }
    return per_image("warm", make)


def task_test_image() -> dict[str, Any] | Iterator[dict[str, Any]]:
    def make(image: Image) -> dict[str, Any]:
        return {
            "basename": "test-image",
            "doc": "Upload the project and run test.command (or --cmd) in throwaway VMs of the baked image",
            "params": [
                {"name": "command", "long": "cmd", "type": str, "default": str(get_var("cmd", "") or ""),
                 "help": "command to run instead of test.command (cmd=... works too)"},
                {"name": "keep", "long": "keep", "type": bool, "default": flag(get_var("keep", "0")),
                 "help": "keep the VM running afterwards, with its SSH command printed (keep=1 works too)"},
                {"name": "jobs", "short": "j", "long": "jobs", "type": int, "default": 0,
                 "help": "VMs at once (default test.parallel)"},
            ],
            "task_dep": [image.task("bake")],
            "actions": [(doit_action(run_test_task), [image.pipeline, image.paths])],
            "uptodate": [False],
            "verbosity": 2,
        }
    return per_image("test-image", make)


def task_console() -> dict[str, Any] | Iterator[dict[str, Any]]:
    def make(image: Image) -> dict[str, Any]:
        return {
            "doc": "Boot a throwaway VM of the baked image with its serial console on this terminal",
            "task_dep": [image.task("bake")],
            "actions": [(doit_action(run_console), [image.pipeline, image.paths])],
            "uptodate": [False],
            "verbosity": 2,
        }
    return per_image("console", make)
