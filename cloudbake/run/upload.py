"""What test.upload sends into the guest: the git work tree holding the pipeline, or listed paths.

The user's files and only those. Whatever the user's ignore files say, cloudbake's own
folders (``output.dir``, ``build.dir``, ``cache.dir``: baked images, downloads, warm sets
with their keys, run folders) and doit's state are never sent: a newcomer's layout keeps
them inside the work tree. Globs are matched by a walk that never follows a symlinked
folder and drops anything whose real path leaves the pipeline's folder, under a deadline,
and every folder is listed file by file, so tar (run with ``--no-recursion``) sends exactly
the names listed here.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.runner import run
from cloudbake.core.units import human_bytes

log = stage_logger("test-image")
LISTING_DEADLINE_S = 60.0
LISTING_MAX_ENTRIES = 1_000_000
_MAGIC = re.compile(r"[*?\[]")


def own_paths(pipeline: Pipeline) -> tuple[Path, ...]:
    """cloudbake's own folders and files for this pipeline, as real paths: never uploaded."""
    # doit's state of every pipeline in the folder (with SQLite's -wal/-shm/-journal files).
    states = pipeline.file.parent.glob(".doit-*.sqlite*")
    found = [pipeline.output_dir, pipeline.build_dir, pipeline.cache_dir, *states]
    return tuple(Path(os.path.realpath(path)) for path in found)


class Listing:
    """Names below ``root`` (relative, '/'-separated), walked without following links, minus ``skip``."""

    def __init__(self, root: Path, skip: tuple[Path, ...], deadline_s: float | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        self.skip = skip
        self.end = time.monotonic() + (LISTING_DEADLINE_S if deadline_s is None else deadline_s)
        self.count = 0

    def is_own(self, path: Path) -> bool:
        return any(path == own or own in path.parents for own in self.skip)

    def keep(self, name: str, entry: os.DirEntry[str] | None = None) -> bool:
        """False for cloudbake's own paths and for names whose real path leaves the root."""
        if entry is not None and not entry.is_symlink():   # below a real folder of the root: no resolving
            return not self.is_own(self.root / name)
        real = Path(os.path.realpath(self.root / name))
        link = Path(os.path.realpath((self.root / name).parent)) / Path(name).name
        if self.is_own(real) or self.is_own(link):
            return False
        return real == self.root or self.root in real.parents

    def _tick(self) -> None:
        self.count += 1
        if self.count > LISTING_MAX_ENTRIES or time.monotonic() > self.end:
            raise PipelineError(f"test.upload: listing {self.root} took longer than {LISTING_DEADLINE_S:.0f} s "
                                f"or more than {LISTING_MAX_ENTRIES:,} entries; stopped",
                                hint="narrow test.upload to the folders the tests need")

    def walk(self, top: str, max_depth: int | None = None) -> Iterator[str]:
        """``top`` (a folder name, '' for the root) and everything below it, depth-limited; links not entered."""
        start = self.root / top if top else self.root
        if os.path.islink(start) or not start.is_dir():
            return
        stack: list[tuple[str, int]] = [(top, 0)]
        while stack:
            folder, depth = stack.pop()
            try:
                entries = sorted(os.scandir(self.root / folder if folder else self.root), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                self._tick()
                name = f"{folder}/{entry.name}" if folder else entry.name
                if not self.keep(name, entry):
                    continue
                yield name
                if entry.is_dir(follow_symlinks=False) and (max_depth is None or depth + 1 < max_depth):
                    stack.append((name, depth + 1))


def translate(pattern: str) -> re.Pattern[str]:
    """A glob as a regex over '/'-separated names: ``*`` and ``?`` stay in one component, ``**`` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and (close := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:close]
            body = "^" + body[1:] if body.startswith("!") else body
            out, i = out + "[" + body.replace("\\", "\\\\") + "]", close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def match_pattern(listing: Listing, pattern: str) -> list[str]:
    """The names ``pattern`` matches below the listing's root (folders included as names)."""
    parts = [part for part in pattern.split("/") if part not in ("", ".")]
    clean = "/".join(parts)
    if not clean:   # '.': the whole folder
        return list(listing.walk(""))
    literal = []
    for part in parts:
        if _MAGIC.search(part):
            break
        literal.append(part)
    if len(literal) == len(parts):   # no wildcard: the path itself
        return [clean] if os.path.lexists(listing.root / clean) and listing.keep(clean) else []
    top = "/".join(literal)
    depth = None if "**" in clean else len(parts) - len(literal)
    regex = translate(clean)
    return [name for name in listing.walk(top, depth) if regex.match(name)]


def expand(listing: Listing, names: list[str]) -> list[str]:
    """Every folder among ``names`` followed by what it holds, so tar needs no recursion of its own."""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:   # listed by a folder above it, whose walk took everything below: walk once
            continue
        for item in (name, *(listing.walk(name) if os.path.isdir(listing.root / name)
                             and not os.path.islink(listing.root / name) else ())):
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


def upload_selection(pipeline: Pipeline) -> tuple[Path, list[str]] | None:
    """(folder the names are relative to, the names) of what test.upload sends, or None for nothing."""
    upload = pipeline.test.upload
    base = pipeline.file.parent
    if upload is None:
        return None
    if upload == "git":
        found = git_work_tree_files(base)
        if found is None:
            return None
        root, listed = found
        listing = Listing(root, own_paths(pipeline))
        return listing.root, expand(listing, [name for name in listed if listing.keep(name)])
    listing = Listing(base, own_paths(pipeline))
    names: list[str] = []
    for pattern in upload:
        matches = match_pattern(listing, pattern)
        if not matches:
            raise PipelineError(f"test.upload: {pattern!r} matches nothing in {base}",
                                hint="paths and globs are relative to the pipeline's folder (cloudbake's own "
                                     "folders and links that leave it are never uploaded)")
        names += matches
    return listing.root, expand(listing, names)


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


def upload_project(pipeline: Pipeline, send: Callable[[Path, list[str]], None],
                   say: Callable[..., None]) -> None:
    """Send what test.upload selects (by default the git work tree) with ``send(root, names)``."""
    try:
        selection = upload_selection(pipeline)
    except PipelineError as err:
        raise MachineryError.from_error("upload", err) from None
    if selection is None:
        return
    root, names = selection
    if not names:
        say("test.upload selects no files in %s: nothing uploaded", root)
        return
    total = sum(os.lstat(root / name).st_size for name in names if not os.path.isdir(root / name))
    say("uploading %d path(s), %s, from %s into %s", len(names), human_bytes(total), root, pipeline.test.workdir)
    send(root, names)
