"""test.upload sends the user's files and only those: never cloudbake's own folders, never through a link."""

from __future__ import annotations

import subprocess
import time

import pytest

from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.run import upload
from cloudbake.run.upload import translate, upload_selection

NEWCOMER = """\
output: {dir: dist}
build: {dir: build}
cache: {dir: .cache}
test: {upload: UPLOAD}
"""


def newcomer_tree(make_pipeline, upload_value: str):
    """A work tree whose output, build and cache folders live inside it, none of them ignored."""
    file = make_pipeline(NEWCOMER.replace("UPLOAD", upload_value))
    root = file.parent
    for name, data in {"src/app.py": "app", "dist/app-abc.qcow2": "image", "dist/.warm/w1/id_ed25519": "PRIVATE",
                       "build/app/runs/r1/id_ed25519": "PRIVATE", ".cache/images/noble.img": "download",
                       f".doit-{file.stem}.sqlite": "state", "README.md": "readme"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(data)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return load_pipeline(file)


@pytest.mark.parametrize("value", ["git", "['**']", "['.']", "['*']"])
def test_cloudbake_never_uploads_its_own_folders(make_pipeline, value):
    pipeline = newcomer_tree(make_pipeline, value)
    root, names = upload_selection(pipeline) or (None, [])
    assert names, "the user's files are sent"
    own = [n for n in names if n.split("/")[0] in ("dist", "build", ".cache") or n.startswith(".doit-")]
    assert own == []
    assert "README.md" in names and "src/app.py" in names


def test_naming_an_own_folder_is_an_error_that_says_why(make_pipeline):
    pipeline = newcomer_tree(make_pipeline, "[src, dist]")
    with pytest.raises(PipelineError, match="'dist' matches nothing") as caught:
        upload_selection(pipeline)
    assert "cloudbake's own folders" in str(caught.value)


def test_a_symlinked_folder_is_not_entered_and_links_that_leave_are_dropped(make_pipeline, tmp_path_factory):
    outside = tmp_path_factory.mktemp("host")
    (outside / "credentials").write_text("SECRET")
    file = make_pipeline("test: {upload: ['src/**']}\n")
    src = file.parent / "src"
    src.mkdir()
    (src / "ok.py").write_text("ok")
    (src / "linked-dir").symlink_to(outside)
    (src / "linked-file").symlink_to(outside / "credentials")
    (src / "inside-link").symlink_to("ok.py")
    _, names = upload_selection(load_pipeline(file)) or (None, [])
    assert names == ["src/inside-link", "src/ok.py"]


def test_links_to_the_folder_itself_do_not_hang_the_listing(make_pipeline):
    file = make_pipeline("test: {upload: ['**']}\n")
    (file.parent / "a").symlink_to(".")
    (file.parent / "b").symlink_to(".")
    started = time.monotonic()
    _, names = upload_selection(load_pipeline(file)) or (None, [])
    assert "a" in names and "b" in names and "a/pipeline.yaml" not in names
    assert time.monotonic() - started < 30   # a loop would never end; not a timing claim


def test_the_listing_has_a_deadline(make_pipeline, monkeypatch):
    file = make_pipeline("test: {upload: ['**']}\n")
    monkeypatch.setattr(upload, "LISTING_DEADLINE_S", -1.0)
    with pytest.raises(PipelineError, match="took longer than"):
        upload_selection(load_pipeline(file))


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("*.py", "a.py", True), ("*.py", "d/a.py", False), ("**/*.py", "d/e/a.py", True), ("**/*.py", "a.py", True),
    ("src/**", "src/a/b", True), ("src/**", "other/a", False), ("t?.txt", "t1.txt", True), ("[!a]x", "bx", True),
    ("[!a]x", "ax", False), ("a.b", "axb", False),
])
def test_glob_translation(pattern, name, matches):
    assert bool(translate(pattern).match(name)) is matches


@pytest.mark.parametrize("value", ["['.']", "['**']"])
def test_a_deep_tree_is_walked_once_per_entry(make_pipeline, monkeypatch, value):
    """'.' and '**' name every folder too: each folder's contents are listed once, not once per folder above
    them (a 12-deep tree took 7.5 visits per entry; a 1,500-deep chain hit the deadline)."""
    file = make_pipeline(f"test: {{upload: {value}}}\n")
    folder = file.parent / "deep"
    for depth in range(200):
        folder = folder / f"d{depth}"
    folder.mkdir(parents=True)
    (folder / "leaf.txt").write_text("x")
    visits = 0
    original = upload.Listing._tick

    def counted(self):
        nonlocal visits
        visits += 1
        original(self)

    monkeypatch.setattr(upload.Listing, "_tick", counted)
    found = upload_selection(load_pipeline(file))
    assert found is not None
    names = found[1]
    assert any(name.endswith("d199/leaf.txt") for name in names) and len(names) == len(set(names))
    assert visits <= 2 * len(names) + 10, (visits, len(names))
