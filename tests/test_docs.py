"""The guide says what the code does: the task graph matches the tasks, every task is documented."""

from __future__ import annotations

import re

import pytest
from doit import doit_cmd

from tests.conftest import PROJECT


@pytest.fixture
def task_dicts():
    doit_cmd.reset_vars()
    doit_cmd.set_var("pipeline", str(PROJECT / "pipeline.yaml"))
    from tasks.bake import task_bake, task_cache_key, task_prune
    from tasks.docs import task_docs
    from tasks.fetch import task_fetch, task_update
    from tasks.seed import task_seed
    from tasks.testrun import task_console, task_test_image
    creators = {"bake": task_bake, "cache-key": task_cache_key, "prune": task_prune, "docs": task_docs,
                "fetch": task_fetch, "update": task_update, "seed": task_seed, "test-image": task_test_image,
                "console": task_console}
    try:
        yield {name: creator() for name, creator in creators.items()}
    finally:
        doit_cmd._CMDLINE_VARS = None


def test_mermaid_edges_are_the_task_dependencies(task_dicts):
    text = (PROJECT / "docs" / "how-it-works.md").read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    solid = set(re.findall(r"^\s*([\w-]+) --> ([\w-]+)\s*$", block, re.M))
    expected = {(dep, name) for name, task in task_dicts.items() for dep in task.get("task_dep", [])}
    assert solid == expected


def test_every_task_is_in_the_readme(task_dicts):
    readme = (PROJECT / "README.md").read_text()
    for name in task_dicts:
        if name != "console":
            assert f"`doit {name}`" in readme, name
    assert "doit console" in (PROJECT / "docs" / "debugging.md").read_text()


def test_dodo_only_wires():
    """dodo.py imports task functions and sets DOIT_CONFIG; no stage logic lives there."""
    text = (PROJECT / "dodo.py").read_text()
    assert "def " not in text
    assert len(text.splitlines()) < 40
