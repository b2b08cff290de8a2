"""test-image: run a command in a throwaway overlay VM of the base image (not implemented yet)."""

from typing import Any

from doit.exceptions import TaskFailed


def task_test_image() -> dict[str, Any]:
    return {"basename": "test-image", "doc": "Run test.command over SSH in a throwaway VM of the baked image",
            "actions": [lambda: TaskFailed("[test-image] not implemented yet")]}
