"""Loading pipeline.yaml: defaults from the schema, and errors that say where and what."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudbake.config.model import Accel, Arch, Compression, SignaturePolicy
from cloudbake.config.pipeline import load_pipeline
from cloudbake.config.problems import fill_defaults, load_schema
from cloudbake.core.errors import PipelineError
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
        if "propertyNames" in node:  # a map with names of the user's (test.env): its values are typed instead
            assert node["additionalProperties"].get("type"), path
        elif node.get("type") == "object" or "properties" in node:
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

    from cloudbake.config.pipeline import _source_problems
    from cloudbake.config.plan import plan_images
    from cloudbake.config.problems import fill_defaults

    checked = 0
    for doc in sorted((PROJECT / "docs").glob("*.md")):
        blocks = doc.read_text().split("```yaml\n")[1:]
        for block in blocks:
            text = block.split("```", 1)[0]
            if not text.startswith("# pipeline"):
                continue
            document = yaml.safe_load(text)
            jsonschema.Draft202012Validator(load_schema()).validate(document)
            plans, problems = plan_images(document, None)  # matrix keys, from:, names
            assert problems == [], (doc.name, problems)
            for plan in plans:
                jsonschema.Draft202012Validator(load_schema()).validate(plan.document)
                # What loading checks per distribution (releases, channels, how sums are trusted).
                filled = fill_defaults(plan.document, load_schema())
                assert _source_problems(filled["source"], lambda path: (1, 1)) == [], (doc.name, plan.name)
            checked += 1
    assert checked >= 2


def test_configuration_reference_is_current():
    from tasks.docs import REFERENCE, render_configuration_reference

    assert REFERENCE.read_text() == render_configuration_reference(), "run: doit docs"


# --- hostile input: a located message, never a traceback or a hang ---------------------------

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))


@pytest.mark.parametrize(("text", "fragment"), [
    ("vm: {memory: 99999999999999999999G}\n", "vm.memory: '99999999999999999999G' is larger than"),
    ("disk: {size: +99999999999T}\n", "disk.size:"),
    ("vm: {timeout: 999999999999h}\n", "vm.timeout: '999999999999h' is not a duration between 0 and 30 days"),
    ("test: {timeout: 1e400}\n", "test.timeout:"),
    ("vm: {cpus: 2.0}\n", "vm.cpus: 2.0 is not of type 'integer'"),
    ("output: {keep: 2.0}\n", "output.keep: 2.0 is not of type 'integer'"),
    ("vm: {cpus: 100000000000000000000000}\n", "vm.cpus:"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    ("x:\n" + "".join("  " * i + "- \n" for i in range(1, 300)), "nested more than 64 levels deep"),
    (ALIAS_BOMB, "expand to more than 100,000 values"),
    ("a: &a [*a]\n", "pipeline.yaml:1:"),
    ("source: {release: lunarx}\n", "source.release: unknown Ubuntu release 'lunarx'"),
    ("source: {release: '99.04'}\n", "known: bionic (18.04)"),
    ("source: {release: nobel}\n", "(did you mean 'noble'?)"),
])
def test_hostile_pipeline_is_a_located_error(make_pipeline, text, fragment):
    with pytest.raises(PipelineError) as caught:
        load_pipeline(make_pipeline(text))
    assert fragment in str(caught.value)
    assert "pipeline.yaml:" in str(caught.value)


def test_yaml_off_is_the_word_off_in_the_pipeline(make_pipeline):
    """YAML 1.1 reads `off` as false; the pipeline's enum value `off` must work unquoted."""
    pipeline = load_pipeline(make_pipeline("source: {verify: {signature: off}}\n"))
    assert pipeline.source.verify.signature is SignaturePolicy.off


def test_symlink_loop_is_a_located_error(make_pipeline, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(make_pipeline("cloud_init: {user_data: loop}\n"))
    assert "cloud_init.user_data: cannot follow this path" in str(caught.value)
    (tmp_path / "self.yaml").symlink_to(tmp_path / "self.yaml")
    with pytest.raises(PipelineError, match="cannot read pipeline file"):
        load_pipeline(tmp_path / "self.yaml")


def test_alias_bomb_does_not_hang_doit_list(tmp_path):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), "list",
                             f"pipeline={tmp_path / 'bomb.yaml'}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "expand to more than 100,000 values" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(("test_section", "fragment"), [
    ("{forward: [22]}", "guest port 22 is forwarded already"),
    ("{forward: [8080, '18080:8080']}", "guest port 8080 is forwarded twice"),
    ("{forward: ['70000:80']}", "a TCP port is at most 65535"),
    ("{forward: ['18080:80', '18080:8080']}", "test.forward[1]: host port 18080 is named twice"),
    ("{forward: ['8080:']}", "test.forward[0]"),
    ("{upload: [../secrets]}", "leaves the pipeline's folder"),
    ("{upload: [/etc/passwd]}", "leaves the pipeline's folder"),
    ("{upload: true}", "test.upload"),
    ("{upload: []}", "test.upload"),
    ("{env: {'1BAD': x}}", "test.env"),
    ("{env: {GOOD: 1}}", "test.env.GOOD"),
    ("{parallel: 0}", "test.parallel"),
    ("{shards: 0}", "test.shards"),
])
def test_bad_test_settings_are_named(make_pipeline, test_section, fragment):
    with pytest.raises(PipelineError) as caught:
        load_pipeline(make_pipeline(f"test: {test_section}\n"))
    assert fragment in str(caught.value)


def test_test_settings_freeze_into_values(make_pipeline):
    from cloudbake.config.model import Forward

    pipeline = load_pipeline(make_pipeline("test: {forward: [8080, '18080:80'], env: {B: '2', A: x}, "
                                           "upload: false, shards: 3}\n"))
    assert pipeline.test.forward == (Forward(0, 8080), Forward(18080, 80))
    assert pipeline.test.env == (("A", "x"), ("B", "2")) and pipeline.test.upload is None
    assert pipeline.test.shards == 3 and pipeline.test.parallel == 1 and pipeline.test.workdir == "~/src"
