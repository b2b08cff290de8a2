"""The bake's pure parts: the key, cloud-init's verdict, publish argv, pruning. No guest boots here."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest

from cloudbake.config.model import Compression
from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.image.bake import parse_cloud_init_result
from cloudbake.image.build import compute_key, key_inputs, resolve_key
from cloudbake.image.seed import GENERALIZED_MARKER, RESULT_MARKER, STATUS_MARKER, build_seed_files
from cloudbake.image.store import convert_argv, run_prune
from cloudbake.source.lock import Lock, write_lock

PIPELINE = """\
name: k
cloud_init:
  ssh_authorized_keys: []
"""


@pytest.fixture
def locked(make_pipeline):
    def make(text: str = PIPELINE, user_data: str | None = None, sha: str = "a" * 64):
        kwargs = {} if user_data is None else {"user_data": user_data}
        pipeline = load_pipeline(make_pipeline(text, **kwargs))
        paths = resolve_paths(pipeline)
        from cloudbake.source.lock import lock_source
        write_lock(paths.lock_file, Lock(source=lock_source(pipeline.source), url="http://m/x.img", serial="1",
                                         sha256=sha, size=1, signed_by=None, signature_time=None))
        return pipeline, paths
    return make


def _key(pipeline, paths) -> str:
    return resolve_key(pipeline, paths)[0]


def test_key_is_stable(locked):
    pipeline, paths = locked()
    assert _key(pipeline, paths) == _key(pipeline, paths)
    assert len(_key(pipeline, paths)) == 16


@pytest.mark.parametrize(("text", "user_data", "sha"), [
    (PIPELINE + "disk: {size: +30G}\n", None, "a" * 64),
    (PIPELINE + "disk: {compression: none}\n", None, "a" * 64),
    (PIPELINE, "#cloud-config\npackages: [git]\n", "a" * 64),
    (PIPELINE, None, "b" * 64),
    (PIPELINE.replace("cloud_init:", "cloud_init:\n  hostname: other"), None, "a" * 64),
    (PIPELINE + "vm: {bake_qemu_args: ['-device', 'x']}\n", None, "a" * 64),
    (PIPELINE + "vm: {firmware: bios}\n", None, "a" * 64),
    (PIPELINE + "  generalize: false\n", None, "a" * 64),
    (PIPELINE.replace("[]", "['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOnlykey me@laptop']"), None, "a" * 64),
])
def test_key_changes_with_every_image_input(locked, text, user_data, sha):
    base = _key(*locked())
    assert _key(*locked(text, user_data, sha)) != base


@pytest.mark.parametrize("text", [
    "# a comment\n" + PIPELINE,
    PIPELINE + "test: {command: make check, timeout: 1h}\n",
    PIPELINE + "vm: {cpus: 8, memory: 8G, timeout: 2h, accel: tcg}\n",
    PIPELINE + "output: {keep: 9}\n",
    PIPELINE + "vm: {qemu_args: ['-D', '/tmp/qemu.log', '-no-shutdown']}\n",
    PIPELINE + "build: {dir: elsewhere}\noutput: {dir: out}\n",
])
def test_key_ignores_what_does_not_change_the_image(locked, text):
    assert _key(*locked(text)) == _key(*locked())


def test_key_needs_a_lock(make_pipeline):
    pipeline = load_pipeline(make_pipeline(PIPELINE))
    with pytest.raises(PipelineError, match="run cloudbake fetch once and commit the lock file"):
        resolve_key(pipeline, resolve_paths(pipeline))


def test_key_inputs_hold_digests_not_content(locked):
    pipeline, paths = locked()
    inputs = key_inputs(pipeline, Lock({}, "u", None, "c" * 64, 1, None, None), build_seed_files(pipeline))
    text = json.dumps(inputs)
    assert "runcmd" not in text and "ssh-" not in text
    assert compute_key(inputs) == compute_key(json.loads(text))


NONCE = "0f" * 16


def _serial(status: dict, result: dict, generalized: bool = True, nonce: str = NONCE) -> str:
    def enc(doc):
        return base64.b64encode(json.dumps(doc).encode()).decode()
    text = f"[  1.0] booting\n{STATUS_MARKER} {nonce} {enc(status)}\n{RESULT_MARKER} {nonce} {enc(result)}\n"
    return text + (f"{GENERALIZED_MARKER} {nonce}\n" if generalized else "")


def test_result_parse_success():
    serial = _serial({"v1": {"modules-final": {"errors": []}}},
                     {"v1": {"datasource": "DataSourceNoCloud", "errors": []}})
    result = parse_cloud_init_result(serial, NONCE)
    assert result is not None and result.errors == [] and result.generalized
    assert result.datasource == "DataSourceNoCloud"


def test_result_parse_names_the_failing_module():
    error = "('scripts_user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted commands'))"
    serial = _serial({"v1": {"modules-final": {"errors": [error],
                                                "recoverable_errors": {"WARNING": ["w1"]}}}},
                     {"v1": {"errors": [error]}}, generalized=False)
    result = parse_cloud_init_result(serial, NONCE)
    assert result is not None
    assert result.failing_modules() == ["scripts_user"]
    assert result.errors == [error]
    assert result.recoverable == {"WARNING": ["modules-final: w1"]}
    assert not result.generalized


def test_the_guests_own_schema_verdict_is_shown_in_full(make_pipeline, caplog):
    """The guest's cloud-init (older than the schema cloudbake checks with) warned about the user-data: the
    bake shows what its `cloud-init schema --system --annotate` said, escape sequences removed; only this
    boot's lines count."""
    import base64
    import logging

    from cloudbake.image.bake import _check_result
    from cloudbake.image.seed import SCHEMA_MARKER, bake_finish_script

    script = bake_finish_script(generalize=True)
    assert "cloud-init schema --system --annotate" in script
    assert script.index(SCHEMA_MARKER) < script.index("cloud-init clean")   # before the logs are gone
    said = ("22.4.2\nusers:\n  - name: faas\n    sudo: [rule]\t\t# E1\n\x1b[31m# Errors: -------------\x1b[0m\n"
            "# E1: ['rule'] is not valid under any of the given schemas\nstatus: done\n")
    serial = _serial({"v1": {}}, {"v1": {"errors": []}}) + \
        f"{SCHEMA_MARKER} {NONCE} {base64.b64encode(said.encode()).decode()}\n" + \
        f"{SCHEMA_MARKER} other-boot {base64.b64encode(b'not this one').decode()}\n"
    result = parse_cloud_init_result(serial, NONCE)
    assert result is not None and result.guest_schema == said.strip()
    caplog.set_level(logging.WARNING, logger="cloudbake")
    pipeline = load_pipeline(make_pipeline(PIPELINE))
    _check_result(result, pipeline, resolve_paths(pipeline))
    assert "the guest's cloud-init warned about the user-data" in caplog.text
    assert "    sudo: [rule]" in caplog.text and "# E1: ['rule'] is not valid" in caplog.text
    assert "\x1b" not in caplog.text and "not this one" not in caplog.text
    quiet = parse_cloud_init_result(_serial({"v1": {}}, {"v1": {"errors": []}}), NONCE)
    assert quiet is not None and quiet.guest_schema is None


def test_result_absent():
    assert parse_cloud_init_result("[ 1.0] kernel panic\n", NONCE) is None


def test_markers_of_another_boot_are_ignored():
    """An orphaned QEMU or an old log printed success with its own nonce: this boot saw nothing."""
    other = _serial({"v1": {}}, {"v1": {"datasource": "DataSourceNoCloud", "errors": []}}, nonce="ab" * 16)
    assert parse_cloud_init_result(other, NONCE) is None
    mixed = other + f"{GENERALIZED_MARKER} {'ab' * 16}\n" + _serial({"v1": {}}, {"v1": {"errors": []}},
                                                                   generalized=False)
    result = parse_cloud_init_result(mixed, NONCE)
    assert result is not None and not result.generalized


def test_boot_nonce_changes_the_iso_not_the_key(locked):
    from cloudbake.image.build import resolve_key
    from cloudbake.image.seed import BOOT_NONCE_PLACEHOLDER, seed_iso_bytes, with_boot_nonce

    pipeline, paths = locked()
    key, _, seed, _ = resolve_key(pipeline, paths)
    assert BOOT_NONCE_PLACEHOLDER.encode() in seed.user_data
    first, second = with_boot_nonce(seed, "1" * 32), with_boot_nonce(seed, "2" * 32)
    assert b"1" * 32 in first.user_data and BOOT_NONCE_PLACEHOLDER.encode() not in first.user_data
    assert first.meta_data == second.meta_data == seed.meta_data
    assert seed_iso_bytes(first) != seed_iso_bytes(second)
    assert resolve_key(pipeline, paths)[0] == key


@pytest.mark.parametrize(("compression", "expected"), [
    (Compression.zstd, ["-c", "-o", "compression_type=zstd"]),
    (Compression.zlib, ["-c", "-o", "compression_type=zlib"]),
    (Compression.none, []),
])
def test_convert_argv(tmp_path, compression, expected):
    argv = convert_argv("qemu-img", tmp_path / "a", tmp_path / "b", compression)
    assert argv == ["qemu-img", "convert", "-O", "qcow2", *expected, str(tmp_path / "a"), str(tmp_path / "b")]


def test_prune_keeps_the_newest_and_the_pointer(locked):
    pipeline, paths = locked(PIPELINE + "output: {keep: 2}\n")
    paths.output_dir.mkdir(parents=True)
    names = [f"k-{i:016x}.qcow2" for i in range(4)]
    now = time.time()
    for age, name in enumerate(reversed(names)):
        (paths.output_dir / name).write_bytes(b"x")
        (paths.output_dir / name).with_suffix(".json").write_text("{}")
        os.utime(paths.output_dir / name, (now - age * 100, now - age * 100))
    (paths.output_dir / "k.qcow2").symlink_to(names[0])  # the pointer names the oldest
    (paths.output_dir / "other-0000000000000000.qcow2").write_bytes(b"x")
    run_prune(pipeline, paths)
    left = sorted(p.name for p in paths.output_dir.iterdir())
    assert left == sorted([names[0], names[0].replace(".qcow2", ".json"), names[2], names[2].replace(".qcow2", ".json"),
                           names[3], names[3].replace(".qcow2", ".json"), "k.qcow2", "other-0000000000000000.qcow2"])


def test_module_names_are_normalized():
    """cloud-init 22.x says 'scripts-user', newer releases 'scripts_user'."""
    serial = _serial({"v1": {}}, {"v1": {"errors": ["('scripts-user', RuntimeError('x'))"]}})
    result = parse_cloud_init_result(serial, NONCE)
    assert result is not None and result.failing_modules() == ["scripts_user"]


def _qemu_img(*args: str) -> None:
    import subprocess
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda d: _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(d / "up.img")),
     "names a backing file ('/etc/hostname')"),
    (lambda d: _qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.raw'}", str(d / "up.img"), "1M"),
     "keeps its data in an external file"),
    (lambda d: _qemu_img("create", "-q", "-f", "vmdk", str(d / "up.img"), "1M"), "is 'vmdk', not qcow2 or raw"),
])
def test_upstream_that_names_other_files_is_refused(tmp_path, make, fragment):
    from cloudbake.image.bake import inspect_upstream

    make(tmp_path)
    with pytest.raises(PipelineError) as caught:
        inspect_upstream(tmp_path / "up.img")
    assert fragment in str(caught.value)


def test_plain_qcow2_upstream_passes(tmp_path):
    from cloudbake.image.bake import inspect_upstream

    _qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "up.img"), "1M")
    assert inspect_upstream(tmp_path / "up.img")["format"] == "qcow2"


def test_failing_cache_key_says_why_on_stderr_even_with_the_zero_reporter(make_pipeline, tmp_path):
    import subprocess
    import sys

    from tests.conftest import PROJECT

    pipeline = make_pipeline("name: nolock\n")
    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), "-r", "zero", "cache-key",
                             f"pipeline={pipeline}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stdout.strip() == ""
    assert "no pipeline.lock beside pipeline.yaml" in result.stderr and "cloudbake fetch" in result.stderr


def test_published_image_is_checked_once_against_its_manifest(tmp_path):
    """A restored or copied image is hashed before first use; a changed byte is an error naming both digests."""
    from cloudbake.core.files import verified_record
    from cloudbake.image.store import verify_published
    from tests.fixture.offline import offline_project

    offline_project(tmp_path, published=True)
    image = next(p for p in (tmp_path / "dist").glob("offline-*.qcow2"))
    manifest = verify_published(image)
    assert verified_record(image).is_file()
    record = verified_record(image).read_text()
    assert verify_published(image) == manifest and verified_record(image).read_text() == record
    with open(image, "r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    with pytest.raises(PipelineError) as caught:
        verify_published(image)
    message = str(caught.value)
    assert str(manifest.image_sha256) in message and "does not match its manifest" in message
    actual = __import__("cloudbake.core.files", fromlist=["sha256_file"]).sha256_file(image)
    assert actual in message


def test_manifest_without_a_digest_is_refused(tmp_path):
    from cloudbake.image.store import manifest_path, verify_published
    from tests.fixture.offline import offline_project

    offline_project(tmp_path, published=True)
    image = next(p for p in (tmp_path / "dist").glob("offline-*.qcow2"))
    manifest_path(image).write_text('{"name": "offline", "key": "k", "image": {"file": "x"}}')
    with pytest.raises(PipelineError, match="records no SHA-256"):
        verify_published(image)
    for not_a_manifest in ('{"image": {"file": "x"}}', "[]", '{"name": 1, "key": "k", "image": {"file": "x"}}'):
        manifest_path(image).write_text(not_a_manifest)
        with pytest.raises(PipelineError, match="not a cloudbake manifest"):
            verify_published(image)
    manifest_path(image).write_text("{not json")
    with pytest.raises(PipelineError, match="cannot read the manifest"):
        verify_published(image)
