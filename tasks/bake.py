"""bake: boot once so cloud-init runs, then publish a content-hashed base image (not implemented yet)."""

from typing import Any

from doit.exceptions import TaskFailed


def task_bake() -> dict[str, Any]:
    return {"doc": "Boot the upstream image once with the seed and publish <name>-<key>.qcow2",
            "task_dep": ["seed"], "actions": [lambda: TaskFailed("[bake] not implemented yet")]}


def task_cache_key() -> dict[str, Any]:
    return {"basename": "cache-key", "doc": "Print the baked image's key (offline), for CI caches",
            "actions": [lambda: TaskFailed("[cache-key] not implemented yet")]}


def task_prune() -> dict[str, Any]:
    return {"doc": "Delete all but the newest output.keep baked images of this pipeline",
            "actions": [lambda: TaskFailed("[prune] not implemented yet")]}
