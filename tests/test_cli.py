"""The front door: the installed ``cloudbake`` command, run as a user runs it, in a folder that is not this
repository (an offline project; stand-in QEMU programs where a VM would start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cloudbake
from tasks.verbs import SUMMARIES
from tests.fixture.offline import offline_project
from tests.fixture.standin import install_standin_qemu, path_with

COMMAND = Path(sys.executable).parent / "cloudbake"   # the console script pip installed
VM_VERBS = ("test-image", "up", "ssh", "ps", "down")
EVERY_VERB = (*SUMMARIES, *VM_VERBS)


def cloudbake_cmd(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMMAND), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_lists_every_verb_and_no_doit_internals(tmp_path):
    for asked in (["--help"], ["help"], ["-h"]):
        shown = cloudbake_cmd(tmp_path, *asked)
        assert shown.returncode == 0 and shown.stderr == ""
        for verb in EVERY_VERB:
            assert f"\n  {verb} " in shown.stdout, (asked, verb)
        for internal in ("dumpdb", "strace", "reset-dep", "forget"):
            assert f"\n  {internal} " not in shown.stdout
        assert "125 cloudbake's machinery failed" in shown.stdout
    bare = cloudbake_cmd(tmp_path)
    assert bare.returncode == 2 and bare.stdout == "" and "\n  test-image " in bare.stderr   # nothing baked
    assert not (tmp_path / "dist").exists()


def test_version_is_cloudbakes(tmp_path):
    shown = cloudbake_cmd(tmp_path, "--version")
    assert shown.returncode == 0 and shown.stdout.startswith(f"cloudbake {cloudbake.__version__} (doit ")


@pytest.mark.parametrize("verb", EVERY_VERB)
def test_every_verb_has_help_without_a_pipeline(tmp_path, verb):
    """No pipeline.yaml here: `VERB --help` still says what the verb does and its options."""
    shown = cloudbake_cmd(tmp_path, verb, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: cloudbake {verb}") and "--pipeline FILE" in shown.stdout
    assert cloudbake_cmd(tmp_path, "help", verb).stdout == shown.stdout


@pytest.mark.parametrize(("argv", "fragment"), [
    (["tset-image"], "no verb 'tset-image' (did you mean 'test-image'?)"),
    (["help", "baek"], "no verb 'baek' (did you mean 'bake'?)"),
    (["bake", "--forse"], "unrecognized arguments: --forse"),
    (["test-image", "-j", "two"], "invalid int value: 'two'"),
    (["-r", "zero", "cache-key"], "doit's own options go after `cloudbake doit`"),
])
def test_usage_errors_exit_2_and_say_what(tmp_path, argv, fragment):
    result = cloudbake_cmd(tmp_path, *argv)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_pipeline_option_before_or_after_the_verb_and_json_documents(tmp_path):
    """`-p` on either side; `--json` prints one document on stdout and nothing else, the log on stderr."""
    project = tmp_path / "project"
    project.mkdir()
    pipeline = offline_project(project, published=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = cloudbake_cmd(elsewhere, "-p", str(pipeline), "status", "--json")
    after = cloudbake_cmd(elsewhere, "status", "--json", "--pipeline", str(pipeline))
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    status = json.loads(before.stdout)
    assert json.loads(after.stdout) == status and status["baked"] is True
    key = json.loads(cloudbake_cmd(elsewhere, "cache-key", "--json", "-p", str(pipeline)).stdout)
    assert key == {"image": "offline", "key": status["key"]}
    assert cloudbake_cmd(elsewhere, "-p", str(pipeline), "cache-key").stdout == status["key"] + "\n"
    assert json.loads(cloudbake_cmd(project, "ps", "--json").stdout) == []
    text = cloudbake_cmd(project, "status")
    assert text.returncode == 0 and text.stdout.startswith("pipeline ") and ".  status" in text.stderr


def test_json_of_a_file_of_several_images_is_one_document(tmp_path):
    offline_project(tmp_path, published=True, extra="matrix:\n  vm.memory: [256M, 512M]\n")
    keys = json.loads(cloudbake_cmd(tmp_path, "cache-key", "--json").stdout)
    assert [entry["image"] for entry in keys["images"]] == ["offline-256m", "offline-512m"]
    one = json.loads(cloudbake_cmd(tmp_path, "status", "--json", "--image", "offline-512m").stdout)
    assert one["name"] == "offline-512m"
    assert cloudbake_cmd(tmp_path, "--image", "offline-521m", "status").returncode == 2


def test_a_pipeline_error_is_exit_2_from_every_verb(tmp_path):
    """The same typo: 2 from a task verb and from a VM verb alike, with file, line and a suggestion."""
    pipeline = offline_project(tmp_path)
    pipeline.write_text(pipeline.read_text().replace("memory: 256M", "memroy: 256M"))
    for verb in ("bake", "validate", "test-image", "up", "cache-key"):
        result = cloudbake_cmd(tmp_path, verb)
        assert result.returncode == 2, (verb, result.stderr)
        assert "memroy" in result.stderr and "did you mean 'memory'" in result.stderr and "Traceback" not in \
            result.stderr


def test_exit_statuses_of_failures(tmp_path):
    """A failed task is 1; cloudbake's machinery failing is 125 (its stage named)."""
    offline_project(tmp_path)
    bin_dir = install_standin_qemu(tmp_path / "bin", "works")
    failed_bake = cloudbake_cmd(tmp_path, "bake", env={"PATH": path_with(bin_dir)})
    assert failed_bake.returncode == 1, failed_bake.stderr
    assert "powered off without reporting" in failed_bake.stderr
    no_image = cloudbake_cmd(tmp_path, "test-image", "--no-bake")
    assert no_image.returncode == 125 and "base image: no baked image" in no_image.stderr


def test_closed_stdout_ends_quietly(tmp_path):
    """`cloudbake status | true`: the reader is gone before the first line; no traceback, the status of SIGPIPE."""
    offline_project(tmp_path, published=True)
    for verb in ("status", "cache-key", "ps"):
        done = subprocess.run(["bash", "-c", f"'{COMMAND}' {verb} --json | true; echo \"${{PIPESTATUS[0]}}\" >&2"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] in ("0", "141"), done.stderr


def test_doits_own_commands_stay_reachable(tmp_path):
    offline_project(tmp_path)
    listed = cloudbake_cmd(tmp_path, "doit", "list")
    assert listed.returncode == 0 and "test-image" in listed.stdout
    assert cloudbake_cmd(tmp_path, "list", "--all").stdout.splitlines() == \
        cloudbake_cmd(tmp_path, "doit", "list", "--all").stdout.splitlines()
