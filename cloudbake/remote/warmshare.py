"""Warm sets through the registry: pushed beside the image they were saved from, pulled by this host's key.

A warm set is its own OCI artifact in the image's repository, tagged ``<image key>-warm-<warm
key>``, so a pull asks for exactly the set this host would resume from (same QEMU, machine,
CPU model or host CPU, memory, firmware) and gets the image alone when there is none:

- ``artifactType`` ``application/vnd.cloudbake.warm.v1``;
- the config blob is the set's ``warm.json``: what the state depends on, the SHA-256 of every
  file, the saved VM's public host key; never a private key (the run's key is handed over
  through the key port, warm.py);
- each file (disk, firmware variables, the blank seed, the zstd state) is one or more layers
  titled ``<file>`` or ``<file>.partNNNN``, so ``oras pull`` writes them out;
- annotations name the image's key and SHA-256.

What comes back is data from outside: the record must describe exactly this host's inputs,
every file must match its digest (the layers while they stream, the files against the
record), and the disk may name no backing file but the image it belongs to. Only then is the
set moved into ``.warm/``, where test runs verify it once more before the first restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from cloudbake.config.model import Pipeline, RemoteCache
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import record_verified, sha256_file, write_atomically
from cloudbake.core.log import stage_logger
from cloudbake.core.units import human_bytes
from cloudbake.image.qcow2 import check_standalone, overlay_backing
from cloudbake.image.store import read_manifest
from cloudbake.remote.artifact import KEY_ANNOTATION, manifest_document, plan_layers, refusal
from cloudbake.remote.client import DIGEST, MANIFEST_TYPE, TITLE, Blob, Registry, RegistrySettings
from cloudbake.remote.credentials import resolve_credentials
from cloudbake.remote.registry import LayerAt, fetch_layer
from cloudbake.run.warm import WARM_FILES, WarmSet, find_warm_set, sets_of, warm_key, warm_root
from cloudbake.source.http import Progress, run_parallel

log = stage_logger("registry")

WARM_ARTIFACT_TYPE = "application/vnd.cloudbake.warm.v1"
WARM_CONFIG_TYPE = "application/vnd.cloudbake.warm.record.v1+json"
WARM_LAYER_TYPE = "application/vnd.cloudbake.warm.part.v1"
FILE_ANNOTATION = "dev.cloudbake.warm.file"
MAX_RECORD_BYTES = 1 << 20


def warm_tag(image_key: str, set_key: str) -> str:
    return f"{image_key}-warm-{set_key}"


def push_warm_set(remote: RemoteCache, image: Path, warm: WarmSet, settings: RegistrySettings | None = None) -> str:
    """Push ``warm`` (a set of the published ``image``) as its own artifact; returns its tag."""
    settings = settings or RegistrySettings()
    manifest = read_manifest(image)
    record_bytes = warm.meta.read_bytes()
    record = json.loads(record_bytes)
    if any(name.startswith("id_") for name in os.listdir(warm.folder)):
        raise PipelineError(f"{warm.folder.name} holds a private key (a set saved by an older cloudbake); not "
                            "pushed", hint="delete it; the next cloudbake warm saves one without")
    config = Blob("sha256:" + hashlib.sha256(record_bytes).hexdigest(), len(record_bytes), data=record_bytes)
    layers: list[tuple[str, Blob]] = []
    for name in WARM_FILES:
        path = warm.folder / name
        if path.is_file():
            layers += [(name, blob) for blob in plan_layers(path, settings.layer_bytes)]
    registry = Registry(remote, settings, resolve_credentials(remote.registry))
    total = config.size + sum(blob.size for _, blob in layers)
    progress = Progress(f"push of {warm.folder.name}", total, 0, stage="registry")
    try:
        registry.upload(config, progress)

        def one(index: int) -> None:
            registry.upload(layers[index][1], progress)

        run_parallel(one, list(range(len(layers))), settings.pull_parallel, registry.stop)
    finally:
        progress.close()
    set_key = warm.folder.name.rsplit("-", 1)[1]
    body = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": WARM_ARTIFACT_TYPE,
        "config": config.descriptor(WARM_CONFIG_TYPE),
        "layers": [{**blob.descriptor(WARM_LAYER_TYPE),
                    "annotations": {TITLE: blob.title, FILE_ANNOTATION: name}} for name, blob in layers],
        "annotations": {KEY_ANNOTATION: manifest.key, "dev.cloudbake.image.sha256": manifest.image_sha256 or "",
                        "dev.cloudbake.warm.key": set_key,
                        "dev.cloudbake.warm.accel": str(record.get("accel", ""))},
    }, indent=2, sort_keys=True).encode()
    tag = warm_tag(manifest.key, set_key)
    registry.put_manifest(tag, body)
    log.info("pushed the warm set %s (%s) to %s:%s", warm.folder.name, human_bytes(total), remote.url, tag)
    return tag


def _parse_warm_artifact(body: bytes, where: str, limit: int) -> tuple[str, int, list[tuple[str, str, int]]]:
    """(config digest, its size, [(file, layer digest, size)] in order), or a refusal."""
    refuse = refusal(where, "warm set")
    doc = manifest_document(body, refuse)
    if doc.get("artifactType") != WARM_ARTIFACT_TYPE:
        raise refuse("another artifactType")
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or config.get("mediaType") != WARM_CONFIG_TYPE or \
            not isinstance(layers, list) or not 1 <= len(layers) <= 4096:
        raise refuse("its config or layers are not a warm set's")
    parts: list[tuple[str, str, int]] = []
    for item in [config, *layers]:
        digest, size = item.get("digest") if isinstance(item, dict) else None, item.get("size") if \
            isinstance(item, dict) else None
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest) or not isinstance(size, int) or \
                isinstance(size, bool) or size < 0:
            raise refuse("a descriptor is malformed")
        if item is not config:
            name = (item.get("annotations") or {}).get(FILE_ANNOTATION)
            if item.get("mediaType") != WARM_LAYER_TYPE or name not in WARM_FILES:
                raise refuse("a layer names no file of a warm set")
            parts.append((str(name), digest, size))
    if sum(size for _, _, size in parts) > limit:
        raise refuse(f"its layers add up to more than {human_bytes(limit)}")
    return str(config["digest"]), int(config["size"]), parts


def pull_warm_set(remote: RemoteCache, pipeline: Pipeline, paths: Paths, image: Path,
                  settings: RegistrySettings | None = None) -> WarmSet | None:
    """The warm set this host would resume ``image`` from, from the registry; None when it has none."""
    from cloudbake.run.warmstart import host_warm_inputs

    settings = settings or RegistrySettings()
    manifest = read_manifest(image)
    inputs, _ = host_warm_inputs(pipeline, paths, manifest)
    set_key = warm_key(inputs)
    found = find_warm_set(image, set_key)
    if found is not None:
        return found
    registry = Registry(remote, settings, resolve_credentials(remote.registry))
    tag = warm_tag(manifest.key, set_key)
    where = f"{remote.url}:{tag}"
    body = registry.manifest(tag)
    if body is None:
        log.info("the registry has no warm set of %s for this host (%s); test runs save one", image.name, tag)
        return None
    config_digest, config_size, parts = _parse_warm_artifact(body, where, settings.max_image_bytes)
    record_bytes = registry.small_blob(config_digest, config_size, MAX_RECORD_BYTES)
    digests = _checked_digests(record_bytes, inputs, {name for name, _, _ in parts}, where)
    warm = WarmSet(warm_root(image) / f"{image.stem}-{set_key}")
    staging = warm.folder.with_name(f".{warm.folder.name}.pull")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, mode=0o700)
    try:
        _fetch_files(registry, parts, staging, settings)
        for name in sorted(digests):
            if sha256_file(staging / name) != digests[name]:
                raise PipelineError(f"{where}: {name} does not match the SHA-256 the set's record holds; refused")
        check_standalone(staging / "disk.qcow2", "a pulled warm set's disk",
                         allowed_backing=overlay_backing(image, warm.folder),
                         hint="cache.remote must name a repository that only cloudbake pushes to")
        for name in digests:
            (staging / name).chmod(0o444)
            record_verified(staging / name, digests[name])
        write_atomically(staging / "warm.json", record_bytes, mode=0o644)
        if warm.folder.exists():
            shutil.rmtree(warm.folder, ignore_errors=True)
        os.replace(staging, warm.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("pulled the warm set %s from %s", warm.folder.name, where)
    return warm


def _checked_digests(record_bytes: bytes, inputs: dict[str, Any], files: set[str], where: str) -> dict[str, str]:
    """The SHA-256 of each file, from a pulled set's record that must describe exactly this host's inputs."""
    try:
        record = json.loads(record_bytes)
    except ValueError:
        raise PipelineError(f"{where}: the warm set's record is not JSON; refused") from None
    if not isinstance(record, dict) or record.get("inputs") != inputs:
        raise PipelineError(f"{where}: the warm set's record describes another machine than this host's; refused")
    digests = record.get("sha256")
    if not isinstance(digests, dict) or set(digests) != files:
        raise PipelineError(f"{where}: the warm set's record names no digest for every file; refused")
    return {str(name): str(digest) for name, digest in digests.items()}


def _fetch_files(registry: Registry, parts: list[tuple[str, str, int]], folder: Path,
                 settings: RegistrySettings) -> None:
    """Each file's layers at their offsets in the file, several at once, each checked against its digest."""
    offsets: list[int] = []
    sizes: dict[str, int] = {}
    for name, _, size in parts:
        offsets.append(sizes.get(name, 0))
        sizes[name] = sizes.get(name, 0) + size
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            f.truncate(size)
    progress = Progress(f"pull of a warm set from {registry.remote.url}", sum(sizes.values()), 0, stage="registry")
    lock = threading.Lock()

    def one(index: int) -> None:
        name, digest, size = parts[index]
        with lock:
            fd = os.open(folder / name, os.O_WRONLY)
        try:
            fetch_layer(registry, LayerAt(digest, size, offsets[index]), fd, settings.http, progress)
        finally:
            os.close(fd)

    try:
        run_parallel(one, list(range(len(parts))), settings.pull_parallel, registry.stop)
    finally:
        progress.close()


def share_warm_sets(pipeline: Pipeline, paths: Paths, image: Path) -> None:
    """With ``cache.remote``, push every warm set of ``image`` this machine saved; a failure is a warning."""
    remote = pipeline.remote
    if remote is None:
        return
    for warm in sets_of(image):
        try:
            push_warm_set(remote, image, warm)
        except PipelineError as err:
            log.warning("the warm set %s was not pushed: %s", warm.folder.name, err.message)


def try_pull_warm_set(pipeline: Pipeline, paths: Paths, image: Path) -> None:
    """After an image came from the registry: its warm set for this host too, if there is one (a warning
    otherwise: test runs then save one)."""
    if pipeline.remote is None or not pipeline.test.warm:
        return
    try:
        pull_warm_set(pipeline.remote, pipeline, paths, image)
    except PipelineError as err:
        log.warning("the warm set of %s was not pulled: %s; test runs save one", image.name, err.message)
