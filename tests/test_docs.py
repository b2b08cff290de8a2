"""The guide says what the code does: the task graph matches the tasks, every task is documented."""

from __future__ import annotations

import re

import pytest
from doit import doit_cmd

from tests.conftest import PROJECT


@pytest.fixture
def task_dicts():
    """Every task the tool offers (the same definitions the cloudbake command loads), plus docs."""
    from cloudbake.cli import task_definitions
    from tasks.docs import task_docs

    doit_cmd.reset_vars()
    doit_cmd.set_var("pipeline", str(PROJECT / "pipeline.yaml"))
    _, modules = task_definitions()
    creators = {"docs": task_docs}
    for module in modules:
        for name in dir(module):
            if name.startswith("task_"):
                creators[name.removeprefix("task_").replace("_", "-")] = getattr(module, name)
    try:
        yield {name: creator() for name, creator in creators.items()}
    finally:
        doit_cmd._CMDLINE_VARS = None


def test_mermaid_edges_are_the_task_dependencies(task_dicts):
    text = (PROJECT / "docs" / "how-it-works.md").read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    solid = set(re.findall(r"^\s*([\w-]+) --> ([\w-]+)\s*$", block, re.M))
    expected = {(dep, name) for name, task in task_dicts.items() for dep in task.get("task_dep", [])}
    producers = {target: name for name, task in task_dicts.items() for target in task.get("targets", [])}
    expected |= {(producers[dep], name) for name, task in task_dicts.items() for dep in task.get("file_dep", [])
                 if dep in producers}  # doit orders a task after the task whose target it reads
    assert solid == expected


def test_every_verb_is_in_the_readme(task_dicts):
    """The README's table lists every verb of the cloudbake command (tasks and VM verbs); `doit docs` is this
    repository's own task."""
    from cloudbake.cli import VM_VERBS

    readme = (PROJECT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n\n", 2)[2]
    for name in [*task_dicts, *VM_VERBS]:
        if name == "docs":
            assert "`doit docs`" in readme
        else:
            assert f"`cloudbake {name}`" in table or f"/ `{name}`" in table, name
    assert "doit console" in (PROJECT / "docs" / "debugging.md").read_text()
