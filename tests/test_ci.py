"""The shipped CI pieces: the GitHub workflow is valid and wired to the cache key; .ci/run runs the README's command."""

from __future__ import annotations

import re

import yaml

from tests.conftest import PROJECT


def test_workflow_caches_on_the_key_and_bakes_then_tests():
    workflow = yaml.safe_load((PROJECT / ".github" / "workflows" / "base-image.yml").read_text())
    steps = workflow["jobs"]["image"]["steps"]
    runs = [step.get("run", "") for step in steps]
    key_step = next(step for step in steps if step.get("id") == "key")
    assert "doit -r zero cache-key" in key_step["run"] and "GITHUB_OUTPUT" in key_step["run"]
    cache = next(step for step in steps if str(step.get("uses", "")).startswith("actions/cache@"))
    assert "steps.key.outputs.key" in cache["with"]["key"]
    assert "dist" in cache["with"]["path"].split()
    order = [i for i, run in enumerate(runs) if "doit bake" in run or "doit test-image" in run]
    assert len(order) == 2 and runs[order[0]].endswith("doit bake") and "test-image" in runs[order[1]]
    assert steps.index(cache) < order[0]
    assert True in workflow or "on" in workflow  # YAML 1.1 reads the key `on` as True


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    readme = (PROJECT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 2
    bake, test = commands
    assert "bake" in bake and "test" in test
    assert test in (PROJECT / ".ci" / "run").read_text()
