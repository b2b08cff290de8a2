"""The shipped CI: the workflow's steps run as GitHub runs them (tests/fixture/actions.py), and .ci/run runs
the README's test command. The replays that bake and boot are in test_e2e.py; these need no guest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from tests.fixture.actions import ExpressionError, LocalRunner, _evaluate
from tests.fixture.offline import offline_project
from tests.fixture.plugin import BuiltPackage
from tests.fixture.standin import install_standin_qemu, path_with

WORKFLOW = PROJECT / ".github" / "workflows" / "base-image.yml"


def clone_for_ci(dest: Path) -> Path:
    """A fresh clone of this repository (its committed state): the workflow's ``uses: ./`` is its action.yml."""
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(dest)], check=True)
    return dest


def replay(workspace: Path, cache_root: Path, home: Path, built: BuiltPackage, pipeline: str = "pipeline.yaml",
           image: str = "", env: dict[str, str] | None = None, workflow: Path = WORKFLOW,
           actions: dict[str, Path] | None = None):
    """One job of ``workflow`` as a runner plays it; the action installs the wheel built from this checkout
    (offline, from the wheelhouse) instead of building it from the action's folder."""
    home.mkdir(parents=True, exist_ok=True)
    return LocalRunner(workflow, next(iter(yaml.safe_load(workflow.read_text())["jobs"])), workspace, cache_root,
                       home, env={"XDG_CACHE_HOME": str(home / ".cache"), **built.pip_env(), **(env or {})},
                       inputs={"cloudbake-version": str(built.wheel), "pipeline": pipeline, "image": image},
                       actions=actions).run()


@pytest.mark.parametrize(("expression", "expected"), [
    ("always()", True),
    ("steps.image.outputs.cache-hit != 'true'", True),
    ("steps.key.outputs.key == 'abc'", True),
    ("always() && steps.key.outputs.upstream != '' && steps.x.outputs.y != 'true'", True),
    ("success() && (runner.environment == 'github-hosted')", False),
    ("failure() || steps.key.outputs.key == 'zzz'", False),
    ("!failure()", True),
])
def test_expressions_evaluate_like_github(expression, expected):
    context = {"steps": {"key": {"outputs": {"key": "abc", "upstream": "d1"}}, "image": {"outputs": {}}},
               "runner": {"environment": "self-hosted"}}
    assert bool(_evaluate(expression, context, {"success": True, "failure": False, "cancelled": False})) is expected


def test_unknown_expressions_are_refused_not_guessed():
    with pytest.raises(ExpressionError):
        _evaluate("hashFiles('x')", {}, {"success": True, "failure": False, "cancelled": False})


def test_unresolvable_key_fails_at_the_key_step(tmp_path, built_package):
    """A broken lock: the key step fails loudly, nothing is restored, baked or tested, the summary says why."""
    workspace = clone_for_ci(tmp_path / "clone")
    offline_project(workspace)  # a project whose pipeline.yaml needs no network
    (workspace / "pipeline.lock").write_text("{ this is not a lock")
    run = replay(workspace, tmp_path / "cache", tmp_path / "home", built_package)
    key_step = run.step("Compute the image key")
    assert key_step.outcome == "failure"
    assert "not a valid cloudbake lock file" in key_step.stderr
    assert [s.outcome for s in run.steps if "Restore" in s.name or "Bake" in s.name or "Test" in s.name] == \
        ["skipped"] * 4
    assert run.step("Job summary").outcome == "success"
    assert "could not be computed" in run.summary and "not a valid cloudbake lock file" in run.summary
    assert run.step("Upload serial logs").outcome == "success"
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_one_image_of_a_matrix_per_job(tmp_path, built_package):
    """CLOUDBAKE_IMAGE picks one image of a file that describes several, as a job of a job matrix does:
    the lock, the key, the cache entry, the bake and the test run are that image's."""
    import json

    from cloudbake.ci import ci_images

    workspace = clone_for_ci(tmp_path / "clone")
    pipeline = offline_project(workspace, published=True, extra="matrix:\n  vm.memory: [256M, 512M]\n")
    pipeline.write_text(pipeline.read_text().replace("timeout: 10m}", "timeout: 4s}"))
    keys = {entry["image"]: entry["key"] for entry in ci_images(pipeline)}
    assert set(keys) == {"offline-256m", "offline-512m"} and len(set(keys.values())) == 1  # memory is not in a key
    env = {"CLOUDBAKE_STANDIN_GUEST_SECONDS": "60",
           "PATH": path_with(install_standin_qemu(tmp_path / "bin", "works"))}
    run = replay(workspace, tmp_path / "cache", tmp_path / "home", built_package, image="offline-512m", env=env)
    outcomes = {step.name: step.outcome for step in run.steps}
    assert outcomes["Pin the upstream image if the lock is not committed"] == "success"
    assert run.outputs["lock"]["fetched"] == "false"  # pipeline.offline-512m.lock is there
    assert run.outputs["key"]["key"] == keys["offline-512m"]
    # The action's outputs, as the workflow's step (id: cloudbake) exposes them.
    assert run.outputs["cloudbake"]["key"] == keys["offline-512m"] and run.outputs["cloudbake"]["exit-status"] == "125"
    assert run.outputs["key"]["entry"] == f"offline-512m-{keys['offline-512m']}"
    assert outcomes["Bake (a no-op when the image was restored)"] == "success"
    assert "starting qemu" not in run.step("Bake").stderr
    assert (tmp_path / "cache" / f"cloudbake-image-Linux-offline-512m-{keys['offline-512m']}").is_dir(), \
        "\n".join(f"{step.name}: {step.outcome}\n{step.stderr[-1500:]}" for step in run.steps)
    tested = run.step("Test inside a throwaway VM")
    assert tested.outcome == "failure" and "did not happen within test.timeout" in tested.stderr
    assert "-m 512" in tested.stderr or "512" in json.dumps(tested.stderr)  # the 512M image's VM
    assert "## cloudbake: offline-512m" in run.summary


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


def test_mirror_credentials_never_reach_a_load_error(tmp_path):
    """A pipeline whose mirror URL carries a token and fails to load: the job summary, `ci outputs` and the
    command's own error show the mirror without its credentials (the error is redacted where it is made)."""
    import sys

    (tmp_path / "cloud-init").mkdir()
    (tmp_path / "cloud-init" / "user-data.yaml").write_text("#cloud-config\n")
    (tmp_path / "pipeline.yaml").write_text('source:\n  mirror: "ftp://user:s3cr3t@mirror.example/"\n')
    outputs = []
    for argv in (["-m", "cloudbake.ci", "summary", "pipeline.yaml"], ["-m", "cloudbake.ci", "outputs", "pipeline.yaml"],
                 ["-m", "cloudbake.cli", "validate"]):
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        outputs.append(done.stdout + done.stderr)
    assert all("'ftp://***@mirror.example/' is not a mirror URL" in text for text in outputs), outputs
    assert not any("s3cr3t" in text for text in outputs)


# Majors checked in each action's own repository with the search tool's fetch (tags and branches), 2026-12-06:
# actions/checkout v7 (v7.0.1), actions/cache v5 (restore/ and save/ at v5; the snapshot's tags stop at v5.0.5),
# actions/upload-artifact v7 (v7.0.0), pypa/gh-action-pypi-publish release/v1 (the branch its README names).
VERIFIED_ACTIONS = {"actions/checkout@v7", "actions/cache/restore@v5", "actions/cache/save@v5",
                    "actions/upload-artifact@v7", "pypa/gh-action-pypi-publish@release/v1"}


def test_every_action_the_action_and_workflows_use_is_a_verified_major():
    """action.yml and the workflows load as YAML, and each `uses:` names an action at a major that exists in
    its own repository (or this repository's own action)."""
    documents = [PROJECT / "action.yml", *sorted((PROJECT / ".github" / "workflows").glob("*.yml"))]
    used = set()
    for file in documents:
        document = yaml.safe_load(file.read_text())
        steps = document["runs"]["steps"] if "runs" in document else [
            step for job in document["jobs"].values() for step in job["steps"]]
        used |= {step["uses"] for step in steps if "uses" in step}
    assert "./" in used   # the shipped workflow runs the action users get
    assert used - {"./"} <= VERIFIED_ACTIONS, used - VERIFIED_ACTIONS - {"./"}
    action = yaml.safe_load((PROJECT / "action.yml").read_text())
    assert set(action["inputs"]) == {"pipeline", "image", "command", "jobs", "warm", "cloudbake-version", "python"}
    assert set(action["outputs"]) == {"key", "image-cache-hit", "exit-status"}
