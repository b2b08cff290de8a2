"""Loading pipeline.yaml: defaults from the schema, and errors that say where and what."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.errors import PipelineError
from tasks.pipeline import Accel, Arch, Compression, SignaturePolicy, fill_defaults, load_pipeline, load_schema
from tests.conftest import PROJECT


def test_shipped_pipeline_loads():
    pipeline = load_pipeline(PROJECT / "pipeline.yaml")
    assert pipeline.name == "ubuntu-noble"
    assert pipeline.source.release == "noble"
    assert pipeline.source.arch is Arch.amd64
    assert pipeline.source.mirror == "https://cloud-images.ubuntu.com/"
    assert pipeline.source.verify.fingerprints == ("D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",)
    assert pipeline.disk.size.growth and pipeline.disk.size.bytes == 20 << 30
    assert pipeline.vm.cpus == 2 and pipeline.vm.memory_bytes == 2 << 30
    assert pipeline.vm.accel is Accel.auto


def test_minimal_pipeline_gets_schema_defaults(make_pipeline):
    pipeline = load_pipeline(make_pipeline("name: tiny\n"))
    assert pipeline.name == "tiny"
    assert pipeline.disk.compression is Compression.zstd
    assert pipeline.source.verify.signature is SignaturePolicy.required
    assert pipeline.vm.timeout_s == 1800
    assert pipeline.output_dir == pipeline.file.parent / "dist"
    assert pipeline.cloud_init.user_data == pipeline.file.parent / "cloud-init" / "user-data.yaml"


def test_defaults_come_from_the_schema_not_the_code():
    schema = load_schema()
    filled = fill_defaults({}, schema)
    assert filled["vm"]["memory"] == schema["properties"]["vm"]["properties"]["memory"]["default"]
    assert filled["source"]["verify"]["signature"] == "required"


def test_relative_paths_resolve_against_the_pipeline_folder(make_pipeline, monkeypatch, tmp_path):
    file = make_pipeline("output: {dir: out}\ncache: {dir: ../c}\n")
    monkeypatch.chdir("/")
    pipeline = load_pipeline(file)
    assert pipeline.output_dir == tmp_path / "out"
    assert pipeline.cache_dir == tmp_path.parent / "c"


def test_frozen():
    pipeline = load_pipeline(PROJECT / "pipeline.yaml")
    with pytest.raises(AttributeError):
        pipeline.name = "x"  # type: ignore[misc]


BAD = [
    ("vm:\n  memroy: 2G\n", "pipeline.yaml:2:3: vm.memroy: unknown key (did you mean 'memory'?)"),
    ("vm:\n  cpus: two\n", "pipeline.yaml:2:9: vm.cpus: 'two' is not of type 'integer'"),
    ("vm:\n  accel: kvmm\n", "pipeline.yaml:2:10: vm.accel: 'kvmm' is not one of: auto, kvm, hvf, tcg (did you mean 'kvm'?)"),
    ("disk:\n  size: 20 gigs\n", "pipeline.yaml:2:9: disk.size: '20 gigs' is not a disk size"),
    ("vm:\n  memory: lots\n", "pipeline.yaml:2:11: vm.memory: 'lots' is not a size"),
    ("test:\n  timeout: soon\n", "pipeline.yaml:2:12: test.timeout: 'soon' is not a duration"),
    ("cloud_init:\n  user_data: cloud-init/nope.yaml\n", "pipeline.yaml:2:14: cloud_init.user_data: file not found"),
    ("vm:\n  cpus: [2\n", "pipeline.yaml:3:1: YAML syntax error"),
    ("", "pipeline.yaml:1:1: the pipeline is empty"),
    ("- a\n- b\n", "pipeline.yaml:1:1: the pipeline must be a mapping"),
    ("sourse: {}\n", "pipeline.yaml:1:1: sourse: unknown key (did you mean 'source'?)"),
    ("source:\n  verify:\n    fingerprints: [ABC]\n", "pipeline.yaml:3:20: source.verify.fingerprints[0]: 'ABC' is not valid here"),
    ("source:\n  mirror: ftp://x/\n", "pipeline.yaml:2:11: source.mirror: 'ftp://x/' is not a mirror URL"),
    ("name: a\nname: b\n", "pipeline.yaml:2:1: name: duplicate key"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[b[1].split(": ")[1] for b in BAD])
def test_bad_pipeline_names_file_line_and_key(make_pipeline, text, expected):
    file = make_pipeline(text)
    with pytest.raises(PipelineError) as caught:
        load_pipeline(file)
    message = str(caught.value)
    assert f"{file.parent}/{expected}" in message


def test_every_problem_is_reported_at_once(make_pipeline):
    file = make_pipeline("vm:\n  memroy: 2G\n  cpus: 0\ndisk:\n  compression: lzma\n")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(file)
    message = str(caught.value)
    assert "3 problems" in message
    lines = [line for line in message.splitlines()[1:] if line.startswith(str(file))]
    assert [line.split(": ")[1] for line in lines] == ["vm.memroy", "vm.cpus", "disk.compression"]


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(PipelineError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.yaml")


def test_every_schema_property_has_a_description():
    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}{key} has no description"
            walk(sub, f"{path}{key}.")
    walk(load_schema(), "")


def test_every_object_forbids_unknown_keys():
    def walk(node, path):
        if node.get("type") == "object" or "properties" in node:
            assert node.get("additionalProperties") is False, path or "<root>"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}{key}.")
    walk(load_schema(), "")


def _doit(*args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def test_doit_list_shows_the_stages():
    result = _doit("list")
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"fetch", "seed", "bake", "test-image", "cache-key"} <= names
    for line in result.stdout.splitlines():
        assert len(line.split(None, 1)) == 2, f"task without a doc: {line}"


def test_doit_list_fails_cleanly_on_a_bad_pipeline(make_pipeline):
    bad = make_pipeline("vm:\n  memroy: 2G\n", name="bad.yaml")
    result = _doit("list", f"pipeline={bad}")
    assert result.returncode != 0
    assert f"{bad}:2:3: vm.memroy" in result.stderr
    assert "did you mean 'memory'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_docs_examples_validate():
    """Every ```yaml block in docs/ that looks like a pipeline validates against the schema."""
    import jsonschema

    checked = 0
    for doc in sorted((PROJECT / "docs").glob("*.md")):
        blocks = doc.read_text().split("```yaml\n")[1:]
        for block in blocks:
            text = block.split("```", 1)[0]
            if not text.startswith("# pipeline"):
                continue
            jsonschema.Draft202012Validator(load_schema()).validate(yaml.safe_load(text))
            checked += 1
    assert checked >= 2


def test_configuration_reference_is_current():
    from tasks.docs import REFERENCE, render_configuration_reference

    assert REFERENCE.read_text() == render_configuration_reference(), "run: doit docs"
