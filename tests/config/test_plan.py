"""Many images from one pipeline file: matrix, images:, from: (layered images). No guest boots here.

Loading, naming, the errors with their lines, the keys' dependencies, doit's subtasks, the CI
helper, and the store's layers (real qemu-img on small images).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudbake.ci import ci_images
from cloudbake.config.model import Compression
from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_images, load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.image.bake import make_layer_disk
from cloudbake.image.build import resolve_build, resolve_key
from cloudbake.image.store import backing_files, publish, qemu_img_info, read_manifest, verify_chain
from cloudbake.source.lock import Lock, lock_source, write_lock
from tests.conftest import PROJECT

MATRIX = """\
name: app
matrix:
  release: [noble, jammy]
  arch: [amd64, arm64]
cloud_init:
  ssh_authorized_keys: []
"""

LAYERED = """\
name: app
cloud_init:
  ssh_authorized_keys: []
images:
  - name: base
  - name: deps
    from: base
    cloud_init: {user_data: cloud-init/deps.yaml}
    disk: {flatten: false}
"""


@pytest.fixture
def project(make_pipeline, tmp_path):
    """A pipeline file with locks for every image that pins upstream (as doit fetch writes them)."""
    def make(text: str, sha: str = "a" * 64) -> Path:
        (tmp_path / "cloud-init").mkdir(exist_ok=True)
        (tmp_path / "cloud-init" / "deps.yaml").write_text("#cloud-config\npackages: [git]\n")
        file = make_pipeline(text)
        for pipeline in load_images(file):
            if pipeline.parent is None:
                write_lock(pipeline.lock_file, Lock(source=lock_source(pipeline.source), url="http://m/x.img",
                                                    serial="1", sha256=sha, size=1, signed_by=None,
                                                    signature_time=None))
        return file
    return make


def keys(file: Path) -> dict[str, str]:
    return {p.name: resolve_key(p, resolve_paths(p))[0] for p in load_images(file)}


def test_matrix_names_every_combination_in_key_order(make_pipeline):
    images = load_images(make_pipeline(MATRIX))
    assert [p.name for p in images] == ["app-noble-amd64", "app-noble-arm64", "app-jammy-amd64", "app-jammy-arm64"]
    assert [(p.source.release, str(p.source.arch)) for p in images] == [
        ("noble", "amd64"), ("noble", "arm64"), ("jammy", "amd64"), ("jammy", "arm64")]
    # Each image has its own lock, work folder and published name; the file shares one doit state.
    assert len({p.lock_file for p in images}) == 4
    assert images[1].lock_file.name == "pipeline.app-noble-arm64.lock"
    assert len({resolve_paths(p).work_dir for p in images}) == 4
    assert {resolve_paths(p).doit_state.name for p in images} == {".doit-app.sqlite"}


def test_a_file_of_one_image_keeps_its_names(make_pipeline):
    (pipeline,) = load_images(make_pipeline("name: solo\n"))
    paths = resolve_paths(pipeline)
    assert pipeline.name == "solo" and pipeline.parent is None
    assert paths.lock_file.name == "pipeline.lock" and paths.doit_state.name == ".doit-solo.sqlite"


def test_matrix_spans_any_pipeline_key(make_pipeline):
    images = load_images(make_pipeline("name: m\nmatrix:\n  vm.memory: [1G, 2G]\n  disk.compression: [none]\n"))
    assert [(p.name, p.vm.memory_bytes, p.disk.compression) for p in images] == [
        ("m-1g-none", 1 << 30, Compression.none), ("m-2g-none", 2 << 30, Compression.none)]


def test_layered_images_come_parents_first_and_share_the_root_lock(project):
    file = project(LAYERED.replace("  - name: base\n  - name: deps", "  - name: deps")
                   .replace("disk: {flatten: false}", "disk: {flatten: false}\n  - name: base"))
    deps, base = load_pipeline(file, "deps"), load_pipeline(file, "base")
    assert [p.name for p in load_images(file)] == ["base", "deps"]
    assert deps.parent is not None and deps.parent.name == "base" and base.parent is None
    assert deps.lock_file == base.lock_file and deps.root.name == "base"
    assert deps.cloud_init.user_data.name == "deps.yaml" and base.cloud_init.user_data.name == "user-data.yaml"
    assert deps.disk.flatten is False


def test_matrix_of_layered_images_pairs_each_child_with_its_own_cell(make_pipeline):
    images = load_images(make_pipeline(MATRIX.replace("cloud_init:", "images:\n  - name: base\n  - name: deps\n"
                                                      "    from: base\ncloud_init:")))
    parents = {p.name: p.parent.name for p in images if p.parent}
    assert parents == {"deps-noble-amd64": "base-noble-amd64", "deps-noble-arm64": "base-noble-arm64",
                       "deps-jammy-amd64": "base-jammy-amd64", "deps-jammy-arm64": "base-jammy-arm64"}


BAD = [
    ("name: a\nimages:\n  - name: x\n    from: y\n  - name: y\n    from: x\n", "4:11", "cycle (x -> y -> x)"),
    ("name: a\nimages:\n  - name: base\n  - name: y\n    from: bsae\n", "5:11", "did you mean 'base'"),
    ("name: a\nmatrix:\n  relase: [noble]\n", "3:3", "not a pipeline key (did you mean 'release'?)"),
    ("name: a\nmatrix:\n  vm.memroy: [1G]\n", "3:3", "did you mean 'vm.memory'"),
    ("name: a\nmatrix:\n  name: [x, y]\n", "3:3", "not a pipeline key"),
    ("name: a\nimages:\n  - name: x\n  - name: y\n    from: x\n    source: {arch: arm64}\n", "6:20",
     "arm64 differs from amd64 of 'x'"),
    ("name: a\nimages:\n  - name: x\n    output: {dir: o}\n", "4:5", "shared by every image"),
    ("name: a\nimages:\n  - name: x\n  - name: y\n    vm: {cpus: two}\n", "5:16", "'two' is not of type 'integer' "
                                                                                 "(image y)"),
    ("name: a\nimages:\n  - name: x\n  - name: x\n", "4:11", "two images would be named 'x'"),
    ("name: a\nimages:\n  - name: x\n    from: x\n", "4:11", "cycle (x -> x)"),
    ("name: a\nmatrix:\n  arch: [amd64, arm64]\nimages:\n  - name: x\n    source: {arch: amd64}\n", "6:14",
     "the matrix spans arch already"),
    ("name: a\nmatrix:\n  arch: [amd64, sparc]\n", "3:17", "'sparc' is not one of: amd64, arm64"),
    ("name: a\nmatrix:\n  vm.memory: [1G, 1G]\n", "3:14", "a value is listed twice"),
    ("name: a\nmatrix:\n  arch: []\n", "3:9", "should be non-empty"),
    ("name: a\nimages:\n  - from: x\n", "3:5", "'name' is a required property"),
    ("name: a\nmatrix:\n" + "".join(f"  vm.{k}: [{', '.join(str(v) for v in range(10))}]\n"
                                     for k in ("cpus",)) + "  source.channel: [" + ", ".join(f"c{i}" for i in range(30))
     + "]\n", "3:3", "300 combinations; a file describes at most 256 images"),
    ("name: a\nmatrix:\n  source.channel: [" + ", ".join(f"c{i}" for i in range(200)) + "]\nimages:\n  - name: x\n"
     "  - name: y\n", "5:3", "2 entries x 200 matrix combinations are 400 images"),
    ("name: a\nimages:\n  - name: x\n  - name: y\n    cloud_init: {user_data: nope.yaml}\n", "5:29",
     "file not found"),
]


@pytest.mark.parametrize(("text", "where", "fragment"), BAD)
def test_bad_combinations_are_errors_with_file_and_line(make_pipeline, text, where, fragment):
    file = make_pipeline(text)
    with pytest.raises(PipelineError) as err:
        load_images(file)
    assert f"{file}:{where}:" in str(err.value) and fragment in str(err.value), str(err.value)


def test_an_image_must_be_named_in_a_file_of_several(make_pipeline):
    file = make_pipeline(MATRIX)
    with pytest.raises(PipelineError, match=r"describes 4 images .*name one"):
        load_pipeline(file)
    with pytest.raises(PipelineError, match="did you mean 'app-noble-arm64'"):
        load_pipeline(file, "app-noble-arm46")
    assert load_pipeline(file, "app-jammy-arm64").source.arch == "arm64"


def test_a_changed_base_changes_every_child_key_and_a_changed_child_only_its_own(project, tmp_path):
    file = project(LAYERED)
    before = keys(file)
    (tmp_path / "cloud-init" / "deps.yaml").write_text("#cloud-config\npackages: [git, make]\n")
    child_changed = keys(file)
    assert child_changed["base"] == before["base"] and child_changed["deps"] != before["deps"]
    (tmp_path / "cloud-init" / "user-data.yaml").write_text("#cloud-config\npackages: [vim]\n")
    base_changed = keys(file)
    assert base_changed["base"] != child_changed["base"] and base_changed["deps"] != child_changed["deps"]
    build = resolve_build(load_pipeline(file, "deps"), resolve_paths(load_pipeline(file, "deps")))
    assert build.parent is not None and build.inputs["parent_key"] == build.parent.key
    assert "upstream_sha256" not in build.inputs and build.inputs["settings"]["flatten"] is False


def test_flatten_changes_only_the_layered_image_key(project):
    file = project(LAYERED)
    before = keys(file)
    file.write_text(file.read_text().replace("flatten: false", "flatten: true"))
    after = keys(file)
    assert after["base"] == before["base"] and after["deps"] != before["deps"]


def _doit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def test_doit_sees_one_subtask_per_image_and_cache_key_prints_every_key_offline(project, tmp_path):
    file = project(MATRIX.replace("arch: [amd64, arm64]", "arch: [amd64, arm64]\nimages:\n  - name: app\n"
                                  "  - name: deps\n    from: app"))
    listed = _doit("list", "--all", f"pipeline={file}", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"bake", "bake:app-noble-arm64", "bake:deps-jammy-amd64", "test-image:deps-noble-arm64",
            "cache-key:app-jammy-arm64"} <= names
    assert "fetch:app-noble-amd64" in names and "fetch:deps-noble-amd64" not in names  # children pin nothing
    printed = _doit("-r", "zero", "cache-key", f"pipeline={file}", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    expected = keys(file)
    assert sorted(printed.stdout.splitlines()) == sorted(f"{key}  {name}" for name, key in expected.items())
    one = _doit("-r", "zero", "cache-key:deps-jammy-arm64", f"pipeline={file}", cwd=tmp_path)
    assert one.stdout == f"{expected['deps-jammy-arm64']}  deps-jammy-arm64\n"
    graph = _doit("info", "bake:deps-noble-amd64", f"pipeline={file}", cwd=tmp_path)
    assert "bake:app-noble-amd64" in graph.stdout  # the parent is baked first


def test_ci_images_lists_every_image_with_its_key_for_a_job_matrix(project):
    file = project(LAYERED)
    listed = ci_images(file)
    assert listed == [{"image": "base", "key": keys(file)["base"], "parent": ""},
                      {"image": "deps", "key": keys(file)["deps"], "parent": "base"}]
    printed = subprocess.run([sys.executable, "-m", "cloudbake.ci", "images", str(file)], capture_output=True,
                             text=True, timeout=60, cwd=PROJECT)
    assert json.loads(printed.stdout) == listed


# --- layers in the store (real qemu-img) -----------------------------------------------


def _qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-c", command, str(image)], check=True, capture_output=True)


@pytest.fixture
def parent_published(tmp_path):
    """A published 64 MiB parent image with 8 MiB of data that does not compress, as a bake leaves it."""
    dist = tmp_path / "dist"
    raw = tmp_path / "work.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.truncate(64 << 20)
    work = tmp_path / "work.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work)], check=True)
    dest = dist / "base-aaaaaaaaaaaaaaaa.qcow2"
    publish(work, dest, {"name": "base", "key": "a" * 16, "image": {"file": dest.name}}, Compression.zstd)
    return dest


def _publish_child(tmp_path: Path, parent: Path, flatten: bool) -> Path:
    work = tmp_path / f"child-{flatten}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(parent), str(work), "64M"],
                   check=True)
    _qemu_io(work, "write -P 2 1M 1M")
    dest = parent.parent / f"deps{'-flat' if flatten else ''}-bbbbbbbbbbbbbbbb.qcow2"
    manifest = read_manifest(parent)
    document = {"name": "deps", "key": "b" * 16, "image": {"file": dest.name},
                "parent": {"name": "base", "key": manifest.key, "file": parent.name, "sha256": manifest.image_sha256}}
    publish(work, dest, document, Compression.zstd, backing=None if flatten else parent)
    return dest


def test_a_layer_holds_only_what_it_adds_and_names_its_parent_relatively(tmp_path, parent_published):
    layer = _publish_child(tmp_path, parent_published, flatten=False)
    flat = _publish_child(tmp_path, parent_published, flatten=True)
    info = qemu_img_info(layer)
    assert info["backing-filename"] == parent_published.name and "backing-filename" not in qemu_img_info(flat)
    assert layer.stat().st_size < flat.stat().st_size / 4
    assert json.loads(layer.with_suffix(".json").read_text())["image"]["backing"] == parent_published.name
    compare = subprocess.run(["qemu-img", "compare", str(layer), str(flat)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout  # the same guest disk either way
    verify_chain(layer)
    assert backing_files(layer.parent) == {parent_published.name: layer.name}


def test_a_layer_whose_parent_changed_or_went_is_refused(tmp_path, parent_published):
    layer = _publish_child(tmp_path, parent_published, flatten=False)
    manifest = json.loads(layer.with_suffix(".json").read_text())
    manifest["parent"]["sha256"] = "0" * 64
    layer.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="baked on another"):
        verify_chain(layer)
    parent_published.unlink()
    with pytest.raises(PipelineError, match="not published beside it"):
        verify_chain(layer)


def test_manifests_that_name_a_loop_of_backing_files_are_refused(tmp_path, parent_published):
    """A restored output folder is input too: two manifests naming each other end in an error, not a
    RecursionError."""
    layer = _publish_child(tmp_path, parent_published, flatten=False)
    parent_manifest = json.loads(parent_published.with_suffix(".json").read_text())
    parent_manifest["image"]["backing"] = layer.name
    parent_published.with_suffix(".json").write_text(json.dumps(parent_manifest))
    with pytest.raises(PipelineError, match="loop of backing files"):
        verify_chain(layer)


def test_a_layer_is_published_beside_its_parent_only(tmp_path, parent_published):
    work = tmp_path / "w.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(parent_published), str(work)],
                   check=True)
    elsewhere = tmp_path / "other" / "deps-cccccccccccccccc.qcow2"
    with pytest.raises(PipelineError, match="published beside its parent"):
        publish(work, elsewhere, {"name": "deps", "key": "c" * 16, "image": {"file": elsewhere.name}},
                Compression.none, backing=parent_published)
    assert not elsewhere.exists()


@pytest.mark.parametrize(("child_size", "expected_mib"), [("+20G", 64), ("+32M", 96), ("80M", 80)])
def test_a_layer_grows_its_parent_disk_only_when_it_sets_its_own_size(project, parent_published, tmp_path,
                                                                      child_size, expected_mib):
    file = project(LAYERED.replace("disk: {flatten: false}", f"disk: {{flatten: false, size: {child_size!r}}}"))
    deps = load_pipeline(file, "deps")
    work = tmp_path / "layer.qcow2"
    make_layer_disk(parent_published, 64 << 20, work, deps)
    assert qemu_img_info(work)["virtual-size"] == expected_mib << 20


def test_a_layer_never_shrinks_its_parent_disk(project, parent_published, tmp_path):
    file = project(LAYERED.replace("disk: {flatten: false}", "disk: {flatten: false, size: 32M}"))
    with pytest.raises(PipelineError, match="would shrink base's disk"):
        make_layer_disk(parent_published, 64 << 20, tmp_path / "layer.qcow2", load_pipeline(file, "deps"))


def test_prune_keeps_a_parent_that_a_layer_needs(project, tmp_path, parent_published):
    from cloudbake.image.store import run_prune
    layer = _publish_child(tmp_path, parent_published, flatten=False)
    file = project("name: base\noutput: {dir: dist, keep: 1}\ncloud_init: {ssh_authorized_keys: []}\n")
    pipeline = load_pipeline(file)
    newer = parent_published.with_name("base-dddddddddddddddd.qcow2")
    newer.write_bytes(b"x")
    newer.with_suffix(".json").write_text("{}")
    (parent_published.parent / "base.qcow2").unlink()
    run_prune(pipeline, resolve_paths(pipeline))
    assert parent_published.exists() and layer.exists()


def test_the_images_example_describes_eight_images_with_their_parents():
    images = load_images(PROJECT / "examples" / "images" / "pipeline.yaml")
    assert len(images) == 8
    layered = {p.name: p.parent.name for p in images if p.parent}
    assert layered["deps-jammy-arm64"] == "base-jammy-arm64" and len(layered) == 4
    assert all(not p.disk.flatten for p in images if p.parent)


def test_a_published_flattened_image_does_not_need_its_parent(tmp_path):
    """Baking a self-contained child that is published already returns it without baking its parent
    (no QEMU here: a bake would fail)."""
    from cloudbake.image.bake import run_bake
    from tests.fixture.offline import offline_project

    file = offline_project(tmp_path, published=True, extra="images:\n  - name: base\n  - name: app\n    from: base\n")
    base, app = load_images(file)
    base_image = resolve_build(base, resolve_paths(base)).published(resolve_paths(base))
    base_image.unlink()
    base_image.with_suffix(".json").unlink()
    app_paths = resolve_paths(app)
    assert run_bake(app, app_paths) == resolve_build(app, app_paths).published(app_paths)
    assert not base_image.exists()


def test_a_layer_is_not_pushed_or_pulled_through_the_registry(tmp_path, caplog):
    """`doit push` of a file pushes what can be shared: a layer is left out with a warning (the registry
    on port 9 is never contacted); `doit pull` of a layer is an error that says why."""
    from cloudbake.remote.share import run_pull, run_push
    from tests.fixture.offline import offline_project

    file = offline_project(tmp_path, published=True, extra="images:\n  - name: base\n  - name: app\n    from: base\n"
                                                             "    disk: {flatten: false}\n")
    file.write_text(file.read_text().replace("cache: {dir:", "cache: {remote: 'oci://127.0.0.1:9/cb', dir:"))
    _, app = load_images(file)
    run_push(app, resolve_paths(app))
    assert "not pushing app-" in caplog.text and "layer over base" in caplog.text
    with pytest.raises(PipelineError, match="published as a layer over base"):
        run_pull(app, resolve_paths(app))


def test_a_restored_image_whose_file_names_a_host_file_is_refused(tmp_path):
    """A CI cache is written by whoever can push: both the image and its manifest may be theirs."""
    import hashlib
    import json
    import subprocess

    from cloudbake.image.store import manifest_path
    from tests.fixture.published import make_published

    image = make_published(tmp_path / "dist-owner")
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/hostname", "-F", "raw", str(evil),
                    "16M"], check=True)
    image.write_bytes(evil.read_bytes())
    doc = json.loads(manifest_path(image).read_text())
    doc["image"]["sha256"] = hashlib.sha256(image.read_bytes()).hexdigest()
    manifest_path(image).write_text(json.dumps(doc))
    with pytest.raises(PipelineError, match=r"names a backing file \('/etc/hostname'\); refused"):
        verify_chain(image)


def test_one_file_tests_on_ubuntu_and_debian(make_pipeline):
    """An images: entry per distribution, each with the release its distribution names: two images, each
    with its own source, key and lock."""
    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_images
    from cloudbake.image.build import image_settings

    noble, bookworm = load_images(make_pipeline("""\
        name: suite
        images:
          - name: noble
          - name: bookworm
            source: {distro: debian, release: bookworm, verify: {signature: none}}
        """))
    assert (noble.source.distro, noble.source.release) == ("ubuntu", "noble")
    assert (bookworm.source.distro, bookworm.source.release) == ("debian", "bookworm")
    assert bookworm.source.mirror == "https://cloud.debian.org/images/cloud/" and bookworm.source.verify.fingerprints == ()
    assert image_settings(noble) != image_settings(bookworm)
    assert resolve_paths(noble).lock_file != resolve_paths(bookworm).lock_file


def test_a_layer_cannot_change_the_distribution_it_boots(make_pipeline):
    from cloudbake.config.pipeline import load_images
    from cloudbake.core.errors import PipelineError

    with pytest.raises(PipelineError, match="a layered image has its parent's distribution, release and arch"):
        load_images(make_pipeline("""\
            name: f
            images:
              - name: base
              - name: child
                from: base
                source: {distro: debian, release: bookworm, verify: {signature: none}}
            """))
