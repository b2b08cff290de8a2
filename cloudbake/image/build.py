"""The image being built: what its key covers, and the key. Resolved once per command, offline.

The key is a SHA-256 over everything that can change the image's bytes (the pinned upstream
digest, the image-affecting settings, the seed's files, the recipe version) and nothing else;
docs/how-it-works.md lists both sides.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.config.distros import facts
from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths, resolve_paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.image.seed import SeedFiles, build_seed_files, seed_input_files
from cloudbake.image.store import KEY_HEX_DIGITS, published_image
from cloudbake.source.lock import Lock, read_lock

log = stage_logger("bake")


# Bump when the way an image is made changes (boot steps, finish script, publish options).
RECIPE_VERSION = 1


def image_settings(pipeline: Pipeline) -> dict[str, Any]:
    """The pipeline settings that change the image's bytes, and nothing else.

    Not here, because they never change the image: who bakes and where (home, user, paths,
    time zone, locale, umask), the host's accelerator, CPU and memory sizing, timeouts,
    test and output settings, and ``vm.qemu_args`` (every boot's run-time arguments).
    docs/how-it-works.md lists both sides.
    """
    # An Ubuntu image's key stays what it was before there were other distributions.
    distro = {"distro": str(pipeline.source.distro)} if facts(pipeline.source.distro).named_in_key else {}
    return {
        **distro,
        "arch": str(pipeline.source.arch),
        "disk_size": str(pipeline.disk.size),
        "compression": str(pipeline.disk.compression),
        "firmware": str(pipeline.vm.firmware),
        "bake_qemu_args": list(pipeline.vm.bake_qemu_args),
        "generalize": pipeline.cloud_init.generalize,
        # Only a layered image can be published as a layer (an upstream-based one is always flattened).
        **({"flatten": pipeline.disk.flatten} if pipeline.parent is not None else {}),
    }


def key_inputs(pipeline: Pipeline, lock: Lock, seed: SeedFiles, parent_key: str | None = None) -> dict[str, Any]:
    """A layered image's key covers its parent's key (so a changed base rebakes its children), not the
    upstream digest: the parent's key covers that already."""
    start = {"parent_key": parent_key} if parent_key is not None else {"upstream_sha256": lock.sha256}
    return {
        "recipe": RECIPE_VERSION,
        **start,
        "settings": image_settings(pipeline),
        "seed": {name: hashlib.sha256(data).hexdigest() for name, data in seed.items()},
    }


def compute_key(inputs: dict[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:KEY_HEX_DIGITS]


def require_lock(paths: Paths, pipeline: Pipeline) -> Lock:
    lock = read_lock(paths.lock_file)
    if lock is None:
        raise PipelineError(f"no {paths.lock_file.name} beside {pipeline.file.name}: the upstream image is not "
                            "pinned yet, so the key cannot be computed offline",
                            hint="run cloudbake fetch once and commit the lock file")
    if not lock.matches(pipeline.source):
        raise PipelineError(f"{paths.lock_file} was resolved for another source ({lock.source})",
                            hint="run cloudbake update")
    return lock


@dataclass(frozen=True)
class Build:
    """The image being built, resolved once per command and handed down: what the key covers, and the key."""

    pipeline: Pipeline
    lock: Lock
    seed: SeedFiles          # as the key sees them (the boot nonce is a placeholder)
    inputs: dict[str, Any]   # what the key is a hash of (digests, settings), also recorded in the manifest
    key: str
    parent: Build | None = None   # the build of the image this one is built on (from:)

    def published(self, paths: Paths) -> Path:
        return published_image(paths, self.pipeline.name, self.key)


def resolve_build(pipeline: Pipeline, paths: Paths) -> Build:
    """The build for the pipeline as it is now: offline, no boot, a few milliseconds. Validates the seed.

    A layered image's build holds its parent's, resolved the same way (the lock is the root's).
    One resolution per image per command: the result is kept for this pipeline value and the
    content of its lock file, so doit's up-to-date check, the task's action and the engine
    below it share it, and a lock that ``fetch`` rewrote in the same command resolves afresh.
    """
    lock_file = (paths if pipeline.parent is None else resolve_paths(pipeline.root)).lock_file
    try:
        lock_bytes = lock_file.read_bytes()
    except OSError:
        lock_bytes = None   # require_lock says what is wrong
    memo = (id(pipeline), lock_bytes, _seed_stamps(pipeline))
    kept = _resolved.get(memo)
    if kept is not None and kept[0] is pipeline:
        return kept[1]
    build = _resolve_build(pipeline, paths)
    _resolved[memo] = (pipeline, build)   # the pipeline is kept too, so its id is never reused
    return build


def _seed_stamps(pipeline: Pipeline) -> tuple[tuple[str, int, int] | None, ...]:
    """Name, size and mtime of every file the seeds of the pipeline and its parents read (user-data, key files
    and the files a glob matches now, dependency and CA files): an edit resolves afresh."""
    stamps: list[tuple[str, int, int] | None] = []
    for each in (pipeline, *_ancestors(pipeline)):
        for file in seed_input_files(each):
            try:
                found = file.stat()
            except OSError:
                stamps.append(None)
                continue
            stamps.append((str(file), found.st_size, found.st_mtime_ns))
    return tuple(stamps)


def _ancestors(pipeline: Pipeline) -> list[Pipeline]:
    return [pipeline.parent, *_ancestors(pipeline.parent)] if pipeline.parent is not None else []


def _resolve_build(pipeline: Pipeline, paths: Paths) -> Build:
    global resolutions
    resolutions += 1
    parent = resolve_build(pipeline.parent, resolve_paths(pipeline.parent)) if pipeline.parent else None
    lock = parent.lock if parent is not None else require_lock(paths, pipeline)
    seed = build_seed_files(pipeline, for_bake=True)
    inputs = key_inputs(pipeline, lock, seed, parent.key if parent is not None else None)
    return Build(pipeline, lock, seed, inputs, compute_key(inputs), parent)


# Builds resolved in this process, by pipeline value and lock content; and how many were
# resolved at all (a test counts them).
_resolved: dict[tuple[object, ...], tuple[Pipeline, Build]] = {}
resolutions = 0


def resolve_key(pipeline: Pipeline, paths: Paths) -> tuple[str, dict[str, Any], SeedFiles, Lock]:
    """(key, inputs, seed, lock) of :func:`resolve_build`, for callers that want the parts."""
    build = resolve_build(pipeline, paths)
    return build.key, build.inputs, build.seed, build.lock


def run_cache_key(pipeline: Pipeline, paths: Paths, named: bool = False) -> None:
    """Print the key on stdout (``named``: ``<key>  <image>``, one line per image of a file of several,
    as sha256sum does); on failure, the reason on stderr whatever doit's reporter.

    CI reads stdout (``doit -r zero cache-key``); the zero reporter prints no failures, so an
    error would otherwise leave CI with an empty key and no word why.
    """

    from cloudbake.core.log import redact

    try:
        key, _, _, _ = resolve_key(pipeline, paths)
    except PipelineError as err:
        print(f"cloudbake: cache-key: {redact(str(err))}", file=sys.stderr, flush=True)
        raise
    print(f"{key}  {pipeline.name}" if named else key, flush=True)
