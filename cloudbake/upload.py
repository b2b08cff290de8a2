"""What test.upload sends into the guest: the git work tree holding the pipeline, or listed paths."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from cloudbake.errors import PipelineError
from cloudbake.log import stage_logger
from cloudbake.pipeline import Pipeline
from cloudbake.runner import run

log = stage_logger("test-image")


def upload_selection(pipeline: Pipeline) -> tuple[Path, list[str]] | None:
    """(folder the names are relative to, the names) of what test.upload sends, or None for nothing."""
    upload = pipeline.test.upload
    base = pipeline.file.parent
    if upload is None:
        return None
    if upload == "git":
        return git_work_tree_files(base)
    names: list[str] = []
    for pattern in upload:
        matches = sorted(glob.glob(pattern, root_dir=base, recursive=True, include_hidden=True))
        if not matches:
            raise PipelineError(f"test.upload: {pattern!r} matches nothing in {base}",
                                hint="paths and globs are relative to the pipeline's folder")
        names += [m for m in matches if m not in names]
    return base, names


def git_work_tree_files(folder: Path) -> tuple[Path, list[str]] | None:
    """The work tree's root and its files as ``git ls-files -co --exclude-standard`` lists them."""
    git = shutil.which("git")
    if git is None:
        log.warning("test.upload is git but git is not installed: nothing uploaded (install git, or list paths)")
        return None
    top = run([git, "-C", folder, "rev-parse", "--show-toplevel"], stage="test-image", timeout=30, check=False)
    if top.returncode != 0:
        log.info("%s is not in a git work tree: nothing uploaded (set test.upload to paths to send some)", folder)
        return None
    root = Path(top.stdout.strip())
    listed = run([git, "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 stage="test-image", timeout=120)
    # Tracked files deleted in the work tree are still listed; tar would fail on them.
    names = [name for name in listed.stdout.split("\0") if name and os.path.lexists(root / name)]
    return root, names
