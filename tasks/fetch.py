"""fetch: resolve, verify and download the upstream cloud image (not implemented yet)."""

from typing import Any

from doit.exceptions import TaskFailed


def _not_yet(stage: str) -> TaskFailed:
    return TaskFailed(f"[{stage}] not implemented yet")


def task_fetch() -> dict[str, Any]:
    """Download and verify the upstream image; write pipeline.lock."""
    return {"doc": "Download and verify the upstream image; pin it in pipeline.lock",
            "actions": [lambda: _not_yet("fetch")]}


def task_update() -> dict[str, Any]:
    return {"doc": "Re-resolve the upstream image and rewrite pipeline.lock",
            "actions": [lambda: _not_yet("update")]}
