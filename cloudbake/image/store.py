"""The image store: published images named by key, their manifests, atomic publishing, checks and pruning.

The bake writes it; test runs, CI and `status` read it, without importing the bake.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbake.config.model import Compression, Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import age_s, is_verified, record_verified, sha256_file, write_atomically
from cloudbake.core.log import stage_logger
from cloudbake.core.runner import run
from cloudbake.core.tools import require_tool
from cloudbake.image.qcow2 import check_standalone

log = stage_logger("bake")
# Images are named <name>-<key>.qcow2 with this many hex digits of the key.
KEY_HEX_DIGITS = 16


QEMU_IMG_TIMEOUT_S = 3600


def published_image(paths: Paths, name: str, key: str) -> Path:
    return paths.output_dir / f"{name}-{key}.qcow2"


def manifest_path(image: Path) -> Path:
    return image.with_suffix(".json")


def is_published(image: Path) -> bool:
    return image.is_file() and manifest_path(image).is_file()


def pull_staging(dest: Path) -> Path:
    """Where a pull of ``dest`` keeps its layers until they are joined (kept across tries to resume)."""
    return dest.parent / f".{dest.name}.pull"


PULL_STAGING_MAX_AGE_S = 24 * 3600


def sweep_pull_staging(output_dir: Path, now: float | None = None) -> list[Path]:
    """Remove pull staging folders of images that are published, or untouched for a day.

    ``output.dir`` is what CI caches whole: a failed pull's gigabytes must not ride along.
    """
    import shutil

    now = time.time() if now is None else now
    removed = []
    for folder in sorted(output_dir.glob(".*.pull")) if output_dir.is_dir() else ():
        image = output_dir / folder.name[1:].removesuffix(".pull")
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue   # not ours to remove; a pull into it says what is in the way
            newest = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
        except OSError:   # removed meanwhile by another process, or unreadable: leave it
            continue
        if is_published(image) or age_s(newest, now) > PULL_STAGING_MAX_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def qemu_img_info(image: Path) -> dict[str, Any]:
    qemu_img = require_tool("qemu-img")
    info: dict[str, Any] = json.loads(run([qemu_img, "info", "--output=json", image], stage="bake", timeout=60).stdout)
    return info


def convert_argv(qemu_img: str, source: Path, dest: Path, compression: Compression,
                 backing: str | None = None) -> list[str]:
    """``backing``: publish only what ``source`` adds over its backing file, as a qcow2 backed by this name
    (relative to ``dest``'s folder); None: flatten the whole chain into one self-contained image."""
    argv = [qemu_img, "convert", "-O", "qcow2"]
    if compression is not Compression.none:
        argv += ["-c", "-o", f"compression_type={compression}"]
    if backing is not None:
        argv += ["-B", backing, "-F", "qcow2"]
    argv += [os.fspath(source), os.fspath(dest)]
    return argv


def publish(work_disk: Path, dest: Path, manifest: dict[str, Any], compression: Compression,
            backing: Path | None = None) -> None:
    """Convert into a qcow2 under a temp name, check it, then rename image and manifest into place.

    Self-contained, unless ``backing`` (a published image in the same folder, which the work
    disk is an overlay of) is given: then the image holds only what the work disk adds, and
    names the parent by its file name, so the folder can move as a whole.
    """
    qemu_img = require_tool("qemu-img")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    started = time.monotonic()
    try:
        if backing is not None and backing.resolve().parent != dest.parent.resolve():
            raise PipelineError(f"{backing.name} is not in {dest.parent}: a layer is published beside its parent")
        backing_name = backing.name if backing is not None else None
        run(convert_argv(qemu_img, work_disk, tmp, compression, backing_name), stage="bake",
            timeout=QEMU_IMG_TIMEOUT_S)
        check = run([qemu_img, "check", "-q", tmp], stage="bake", timeout=QEMU_IMG_TIMEOUT_S, check=False)
        if check.returncode not in (0,):
            raise PipelineError(f"qemu-img check found problems in the converted image (exit {check.returncode}): "
                                f"{check.stdout}{check.stderr}")
        info = qemu_img_info(tmp)
        if info.get("backing-filename") != backing_name:
            raise PipelineError(f"the converted image's backing file is {info.get('backing-filename')!r}, "
                                f"not {backing_name!r}")
        if backing_name is not None:
            manifest["image"]["backing"] = backing_name
        manifest["image"]["virtual_size"] = info["virtual-size"]
        manifest["image"]["file_size"] = tmp.stat().st_size
        manifest["image"]["sha256"] = sha256_file(tmp)
        # The manifest is written inside this step: record it up to here (the rest is two renames).
        manifest.setdefault("durations_s", {})["publish"] = round(time.monotonic() - started, 2)
        install(tmp, dest, manifest)
    finally:
        tmp.unlink(missing_ok=True)


def install(tmp: Path, dest: Path, manifest: dict[str, Any]) -> None:
    """Move a complete, checked image from ``tmp`` (same folder) to ``dest`` and publish its manifest.

    The one way an image enters the store (a bake, a pull): the image first, the manifest
    last (until it is there, readers do not count the image as published), then the
    ``<name>.qcow2`` pointer.
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    write_atomically(manifest_path(dest), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    record_verified(dest, manifest["image"]["sha256"])
    pointer = dest.parent / f"{manifest['name']}.qcow2"
    tmp_pointer = dest.parent / f".{manifest['name']}.qcow2.tmp"
    tmp_pointer.unlink(missing_ok=True)
    tmp_pointer.symlink_to(dest.name)
    os.replace(tmp_pointer, pointer)
    # A pull of this image that failed before (the bake went on without it) is of no use now.
    sweep_pull_staging(dest.parent)


@dataclass(frozen=True)
class Manifest:
    """What a published image's manifest says, typed: the fields readers use, and the whole document."""

    name: str
    key: str
    image_file: str
    image_sha256: str | None       # None: baked by a cloudbake that did not record it
    firmware: str = "uefi"         # how the bake booted it: test runs boot it the same way
    accel: str = ""
    accel_reason: str = ""
    durations_s: dict[str, float] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_document(cls, doc: Any, where: Path) -> Manifest:
        problem = PipelineError(f"{where}: not a cloudbake manifest", hint="delete the image and its .json and "
                                                                           "bake again")
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), dict):
            raise problem
        image, qemu = doc["image"], doc.get("qemu") or {}
        name, key, file, digest = doc.get("name"), doc.get("key"), image.get("file"), image.get("sha256")
        if not all(isinstance(v, str) for v in (name, key, file)) or not isinstance(qemu, dict):
            raise problem
        durations = doc.get("durations_s") or {}
        return cls(name=str(name), key=str(key), image_file=str(file),
                   image_sha256=digest if isinstance(digest, str) and len(digest) == 64 else None,
                   firmware=str(qemu.get("firmware", "uefi")), accel=str(qemu.get("accel", "")),
                   accel_reason=str(qemu.get("accel_reason", "")),
                   durations_s={str(k): float(v) for k, v in durations.items() if isinstance(v, (int, float))}
                   if isinstance(durations, dict) else {},
                   document=doc)


def read_manifest(image: Path) -> Manifest:
    try:
        document = json.loads(manifest_path(image).read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"{manifest_path(image)}: cannot read the manifest of {image.name} ({err})",
                            hint="delete the image and its .json and bake again") from None
    return Manifest.from_document(document, manifest_path(image))


def verify_published(image: Path) -> Manifest:
    """The manifest of a published image, once the image matches the SHA-256 the manifest records.

    An image restored from a cache, copied, or touched on disk is hashed once before its
    first use; the ``.verified`` sidecar remembers the verdict for that file (size and
    mtime), so later uses cost nothing. A mismatch is an error, never a boot.
    """
    manifest = read_manifest(image)
    expected = manifest.image_sha256
    if expected is None:
        raise PipelineError(f"{manifest_path(image)} records no SHA-256 for {image.name} (baked by an older "
                            "cloudbake), so it cannot be checked", hint="delete the image and its .json and bake again")
    if is_verified(image, expected):
        return manifest
    log.info("checking %s against its manifest's SHA-256 (once)", image.name)
    actual = sha256_file(image)
    if actual != expected:
        raise PipelineError(f"{image.name} does not match its manifest: its SHA-256 is {actual}, the manifest "
                            f"records {expected}; it changed after it was baked (a corrupted or tampered copy)",
                            hint="delete it and its .json and bake again, or restore it from a cache you trust")
    record_verified(image, expected)
    return manifest


def verify_chain(image: Path, below: tuple[str, ...] = ()) -> Manifest:
    """:func:`verify_published` for the image and every published image it is layered on (a qcow2 whose
    backing file is its parent's image, disk.flatten: false): a test run reads them all."""
    manifest = verify_published(image)
    backing = manifest.document["image"].get("backing")
    # A restored cache is data from outside too: the file itself may name only what its
    # manifest says (nothing, or the parent's file by relative name), whatever the digest.
    plain = isinstance(backing, str) and "/" not in backing and ":" not in backing
    check_standalone(image, "a published image", allowed_backing=backing if plain else None,
                     hint="delete it and its .json and bake again, or restore it from a cache you trust")
    if backing is None:
        return manifest
    parent_file = image.parent / str(backing)
    if not isinstance(backing, str) or "/" in backing or not is_published(parent_file):
        raise PipelineError(f"{image.name} is a layer over {backing!r}, which is not published beside it",
                            hint="bake the parent image again (cloudbake bake), or restore the whole output folder")
    if backing in (*below, image.name):
        raise PipelineError(f"{image.name}: its manifests name a loop of backing files "
                            f"({' -> '.join((*below, image.name, backing))})",
                            hint="delete these images and their .json and bake again")
    parent = verify_chain(parent_file, (*below, image.name))
    recorded = (manifest.document.get("parent") or {}).get("sha256")
    if recorded != parent.image_sha256:
        raise PipelineError(f"{image.name} was baked on another {parent_file.name} than the one published "
                            f"(SHA-256 {parent.image_sha256}, recorded {recorded})",
                            hint="bake both again (cloudbake bake --force)")
    return manifest


def backing_files(folder: Path) -> dict[str, str]:
    """Published images in ``folder`` that other published images there are layers over: file -> a child."""
    found: dict[str, str] = {}
    for manifest in folder.glob("*.json"):
        try:
            backing = json.loads(manifest.read_text())["image"].get("backing")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(backing, str):
            found[backing] = manifest.with_suffix(".qcow2").name
    return found


def run_prune(pipeline: Pipeline, paths: Paths) -> None:
    """Keep the newest ``output.keep`` images of this pipeline (and whatever the pointer names)."""
    images = sorted((p for p in paths.output_dir.glob(f"{pipeline.name}-*.qcow2")
                     if p.is_file() and not p.is_symlink()
                     and re.fullmatch(rf"{re.escape(pipeline.name)}-[0-9a-f]{{{KEY_HEX_DIGITS}}}\.qcow2", p.name)),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)
    pointer = paths.output_dir / f"{pipeline.name}.qcow2"
    current = pointer.resolve() if pointer.is_symlink() else None
    layered_on = backing_files(paths.output_dir)
    for old in images[pipeline.output_keep:]:
        if current is not None and old.resolve() == current:
            continue
        if old.name in layered_on:
            log.info("keeping %s: %s is a layer over it", old.name, layered_on[old.name])
            continue
        log.info("pruning %s", old.name)
        old.unlink()
        manifest_path(old).unlink(missing_ok=True)
