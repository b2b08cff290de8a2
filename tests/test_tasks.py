"""doit's graph for real, through the real doit and the cloudbake command, on an offline project (no boot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.fixture.offline import offline_project
from tests.fixture.standin import install_standin_qemu, path_with, tools_folder


def doit(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def cloudbake(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudbake.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_the_chain_is_doits_graph(tmp_path):
    pipeline = offline_project(tmp_path)
    listing = doit(tmp_path, "list", "--deps", f"pipeline={pipeline}").stdout
    blocks = {block.split()[0]: block for block in listing.split("\n\n") if block.strip()}
    assert "pipeline.lock" in blocks["bake"] and "seed.iso" in blocks["bake"]  # fetch's and seed's targets
    info = doit(tmp_path, "info", "test-image", f"pipeline={pipeline}").stdout
    assert "bake" in info.split("task_dep", 1)[1]


def test_info_bake_reads_as_a_sentence(tmp_path):
    pipeline = offline_project(tmp_path)
    info = doit(tmp_path, "info", "bake", f"pipeline={pipeline}").stdout
    assert "up to date when the image named by the current key is published" in info
    assert "<lambda>" not in info and "<function" not in info


def test_unknown_variable_is_refused_with_a_suggestion(tmp_path):
    pipeline = offline_project(tmp_path)
    result = doit(tmp_path, "list", f"pipline={pipeline}")
    assert result.returncode == 3
    assert "unknown variable 'pipline=" in result.stderr + result.stdout
    assert "did you mean 'pipeline'?" in result.stderr + result.stdout


def test_listing_tasks_writes_nothing_but_doits_state(tmp_path):
    pipeline = offline_project(tmp_path)
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert doit(tmp_path, "list", f"pipeline={pipeline}").returncode == 0
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert after - before <= {Path(".doit-offline.sqlite")}


def test_test_image_options_are_in_its_help(tmp_path):
    pipeline = offline_project(tmp_path)
    text = doit(tmp_path, "help", "test-image", f"pipeline={pipeline}").stdout
    assert "--cmd" in text and "--keep" in text


def test_bake_is_skipped_when_published_and_forced_with_a(tmp_path):
    """Published for the current key: `doit bake` boots nothing; `doit -a bake` bakes again (here the
    stand-in guest reports nothing, so that bake fails, which proves it ran)."""
    pipeline = offline_project(tmp_path, published=True)
    env = {"PATH": path_with(install_standin_qemu(tmp_path / "bin", "works"))}
    skipped = doit(tmp_path, "bake", f"pipeline={pipeline}", env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert "starting qemu" not in skipped.stderr
    forced = doit(tmp_path, "-a", "bake", f"pipeline={pipeline}", env=env)
    assert "starting qemu" in forced.stderr
    assert "powered off without reporting" in forced.stdout + forced.stderr


def test_bake_force_bakes_a_published_image_again(tmp_path):
    """`doit bake --force` is `-a` for the bake alone: doit would skip the action of an up-to-date task."""
    pipeline = offline_project(tmp_path, published=True)
    env = {"PATH": path_with(install_standin_qemu(tmp_path / "bin", "works"))}
    first = doit(tmp_path, "bake", f"pipeline={pipeline}", env=env)  # doit records every task as done
    assert first.returncode == 0 and "starting qemu" not in first.stderr, first.stderr
    forced = doit(tmp_path, "bake", "--force", f"pipeline={pipeline}", env=env)
    assert "starting qemu" in forced.stderr
    assert "powered off without reporting" in forced.stdout + forced.stderr


def test_clean_bake_removes_what_bake_made(tmp_path):
    pipeline = offline_project(tmp_path, published=True)
    image = next((tmp_path / "dist").glob("offline-*.qcow2"))
    result = doit(tmp_path, "clean", "bake", f"pipeline={pipeline}")
    assert result.returncode == 0, result.stderr
    assert not image.exists() and not image.with_suffix(".json").exists()


def test_cli_runs_the_same_tasks_in_any_folder(tmp_path):
    """No dodo.py: the cloudbake command reads ./pipeline.yaml, or -p PATH."""
    offline_project(tmp_path)
    listing = cloudbake(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    for task in ("bake", "test-image", "validate", "status", "cache-key", "fetch", "seed"):
        assert task in listing.stdout
    other = tmp_path / "elsewhere"
    other.mkdir()
    key = cloudbake(other, "-p", str(tmp_path / "pipeline.yaml"), "cache-key")
    assert key.returncode == 0, key.stderr
    assert len(key.stdout) == 17 and key.stdout.endswith("\n")   # the bare key: doit's title went to stderr
    assert cloudbake(other, "cache-key", "--pipeline", str(tmp_path / "pipeline.yaml")).stdout == key.stdout
    missing = cloudbake(other, "list")
    assert missing.returncode == 3 and "pipeline.yaml: pipeline file not found" in missing.stdout + missing.stderr
    # A task verb reports the same missing pipeline as a usage error (2), as the VM verbs do.
    for verb in ("bake", "status", "test-image"):
        refused = cloudbake(other, verb)
        assert refused.returncode == 2, (verb, refused.stderr)
        assert "pipeline.yaml: pipeline file not found" in refused.stderr and "Traceback" not in refused.stderr


def test_status_json_and_validate(tmp_path):
    import json

    pipeline = offline_project(tmp_path, published=True)
    status = cloudbake(tmp_path, "status", "--json", "-p", str(pipeline))
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout[status.stdout.index("{"):status.stdout.rindex("}") + 1])
    assert data["baked"] is True and len(data["key"]) == 16 and data["lock"]["serial"] == "20261128"
    validate = cloudbake(tmp_path, "validate")
    assert "user-data" in validate.stdout and "qemu" in validate.stdout and "firmware" in validate.stdout
    broken = {"PATH": "/nonexistent"}
    failed = subprocess.run([sys.executable, "-m", "cloudbake.cli", "validate"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **broken})
    assert failed.returncode != 0 and "not ready to bake" in failed.stdout + failed.stderr
    assert " ok  zstd" in validate.stdout
    # Without zstd a bake still runs, but warm start cannot: a warning, not a failure.
    tools = tools_folder(tmp_path / "tools", ("qemu-system-x86_64", "qemu-img", "gpgv", "git", "tar", "ssh",
                                              "ssh-keygen"))
    without = subprocess.run([sys.executable, "-m", "cloudbake.cli", "validate"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PATH": str(tools)})
    assert "warn  zstd" in without.stdout and "apt-get install zstd" in without.stdout, without.stdout


@pytest.mark.parametrize(("argv", "expected"), [
    (["-a", "bake"], True), (["--always-execute", "bake"], True), (["-va", "bake"], True),
    (["bake"], False), (["bake", "--cmd", "a"], False), (["-f", "dodo.py", "bake"], False),
])
def test_always_execute_is_read_from_the_command_line(argv, expected):
    from tasks.bake import always_execute_requested

    assert always_execute_requested(argv) is expected


def test_a_command_with_equals_signs_reaches_the_test_run(tmp_path):
    """doit turns any argument with '=' into a variable; `cloudbake test-image --cmd 'a=b'` still works, and
    plain doit says how to write it."""
    pipeline = offline_project(tmp_path, published=True)
    through_cli = cloudbake(tmp_path, "help", "test-image", "--cmd", "dd if=/dev/zero")
    assert through_cli.returncode == 0, through_cli.stderr
    through_doit = doit(tmp_path, "test-image", "--cmd", "dd if=/dev/zero", f"pipeline={pipeline}")
    assert through_doit.returncode == 3
    assert "write cmd='dd if=/dev/zero' instead" in through_doit.stdout + through_doit.stderr


HEAVY = ("requests", "urllib3", "pycdlib", "cloudbake.source", "cloudbake.qemu", "cloudbake.image", "cloudbake.run",
         "cloudbake.remote")


@pytest.mark.parametrize("describe", [
    "from doit.doit_cmd import DoitMain; from doit.cmd_base import ModuleTaskLoader; import dodo; "
    "DoitMain(ModuleTaskLoader(dodo)).run(['list'])",
    "from doit.doit_cmd import DoitMain; from doit.cmd_base import ModuleTaskLoader; import dodo; "
    "DoitMain(ModuleTaskLoader(dodo)).run(['help', 'bake'])",
    "from cloudbake import cli; cli.main(['--help'])",
    "from cloudbake import cli; cli.main(['test-image', '--help'])",
])
def test_describing_tasks_imports_no_http_registry_or_vm_code(describe):
    """`doit list` and `doit help` load the pipeline and the task definitions only; `cloudbake --help` and
    `cloudbake VERB --help` not even the pipeline: the engine is imported where an action or an up-to-date
    check runs."""
    code = f"import sys\n{describe}\nprint('MODULES', *sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    loaded = done.stdout.split("MODULES", 1)[1].split()
    assert ("cloudbake.config.pipeline" in loaded) is ("doit" in describe.split(";")[0]), done.stderr
    assert [name for name in loaded if name in HEAVY or any(name.startswith(heavy + ".") for heavy in HEAVY)] == []
