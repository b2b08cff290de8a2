"""An OCI registry as the remote image cache: push a published image under its key, pull it back.

The artifact is an OCI image manifest (image-spec v1.1) in the ORAS style, so `oras pull`
of it writes the image's parts to files:

- ``artifactType`` ``application/vnd.cloudbake.image.v1``;
- the config blob is the image's manifest JSON, byte for byte (what `dist/` holds beside it);
- the qcow2 is cut into fixed-size layers (titled ``<image>.partNNNN``, in order), so a pull
  fetches several ranges at once and resumes each one;
- annotations: created, source, revision, the key, the upstream serial;
- the tag is the key (and, if asked, a moving ``<name>-latest``).

A push uploads every blob first (skipping those the registry has) and the manifest last, so
a tag never names a partial artifact. A pull checks every blob's digest while it streams and
the whole image against the manifest before the store takes it in.

The registry API (distribution spec v1.1) is spoken directly over the one HTTP session and
retry loop of cloudbake.source.http, which already does resumable, digest-checked downloads. The
`oras` Python SDK is used by the tests to check interoperability; it has no Range resume or
chunked-upload resume, which CI fleets need.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from cloudbake.config.distros import UNNAMED_DISTRO
from cloudbake.config.model import RemoteCache
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import file_lock, sha256_file, write_atomically
from cloudbake.core.log import stage_logger
from cloudbake.core.units import human_bytes
from cloudbake.image.qcow2 import check_standalone
from cloudbake.image.store import (
    Manifest,
    install,
    is_published,
    manifest_path,
    published_image,
    pull_staging,
    qemu_img_info,
    sweep_pull_staging,
    verify_published,
)
from cloudbake.remote.artifact import (
    DISTRO_ANNOTATION,
    KEY_ANNOTATION,
    Artifact,
    artifact_manifest,
    parse_artifact,
    plan_layers,
    provenance,
)
from cloudbake.remote.client import MAX_CONFIG_BYTES, Blob, Registry, RegistrySettings
from cloudbake.remote.credentials import resolve_credentials
from cloudbake.source.http import (
    HttpSettings,
    Progress,
    RateFloor,
    TransferStoppedError,
    body_chunks,
    run_parallel,
    with_retries,
)

log = stage_logger("registry")


# --- push and pull ---------------------------------------------------------------------


def push_image(remote: RemoteCache, image: Path, settings: RegistrySettings | None = None,
               pipeline_dir: Path | None = None) -> str:
    """Push a published image under its key (blobs the registry has are skipped); returns the manifest digest."""
    settings = settings or RegistrySettings()
    manifest = verify_published(image)  # what leaves this machine matches what was baked
    if manifest.document["image"].get("backing"):
        raise PipelineError(f"{image.name} is a layer over {manifest.document['image']['backing']} "
                            "(disk.flatten: false); the registry cache holds self-contained images only",
                            hint="set disk.flatten: true for images you share through cache.remote")
    config_bytes = manifest_path(image).read_bytes()
    config = Blob("sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes), data=config_bytes)
    layers = plan_layers(image, settings.layer_bytes)
    registry = Registry(remote, settings, resolve_credentials(remote.registry))
    started = time.monotonic()
    log.info("pushing %s (%s in %d layer%s) to %s:%s", image.name, human_bytes(image.stat().st_size), len(layers),
             "" if len(layers) == 1 else "s", remote.url, manifest.key)
    progress = Progress(f"push of {image.name}", config.size + sum(b.size for b in layers), 0, stage="registry")
    try:
        sent = config.size if registry.upload(config, progress) else 0
        # Layers go up several at once, like a pull fetches them: one stream rarely fills the link.
        went: dict[int, bool] = {}

        def one(index: int) -> None:
            went[index] = registry.upload(layers[index], progress)

        run_parallel(one, list(range(len(layers))), settings.pull_parallel, registry.stop)
        sent += sum(blob.size for index, blob in enumerate(layers) if went.get(index))
    finally:
        progress.close()
    doc = manifest.document
    annotations = {
        "org.opencontainers.image.created": str(doc.get("created") or ""),
        "org.opencontainers.image.title": manifest.name,
        KEY_ANNOTATION: manifest.key,
        # The key covers the distribution; an image baked before there were others is Ubuntu's.
        DISTRO_ANNOTATION: str((doc.get("inputs") or {}).get("settings", {}).get("distro", UNNAMED_DISTRO.value)),
        "dev.cloudbake.upstream.serial": str((doc.get("inputs") or {}).get("upstream", {}).get("serial", "")),
        **provenance(pipeline_dir or image.parent),
    }
    body = artifact_manifest(config, layers, {k: v for k, v in annotations.items() if v})
    # The tag last: until it is written, nothing names the blobs, so a push cut off here
    # leaves no tag pointing at a partial artifact.
    registry.put_manifest(manifest.key, body)
    if remote.tag_latest:
        registry.put_manifest(f"{manifest.name}-latest", body)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    log.info("pushed %s:%s (%s sent, %.1f s), manifest %s", remote.url, manifest.key, human_bytes(sent),
             time.monotonic() - started, digest[:19])
    return digest


def pull_image(remote: RemoteCache, paths: Paths, name: str, key: str,
               settings: RegistrySettings | None = None) -> Path | None:
    """Pull the image for ``key`` into the store; None when the registry does not have it.

    Layers download in parallel into ``.<image>.pull/``, each resumable and checked against
    its digest as it streams; the joined image must match the SHA-256 of the manifest that
    came with it before the store takes it in (atomically, like a bake's publish).
    """
    settings = settings or RegistrySettings()
    dest = published_image(paths, name, key)
    with file_lock(paths.output_dir / f".{dest.name}.pull.lock", f"the pull of {dest.name}"):
        if is_published(dest):
            verify_published(dest)
            return dest
        registry = Registry(remote, settings, resolve_credentials(remote.registry))
        where = f"{remote.url}:{key}"
        body = registry.manifest(key)
        if body is None:
            log.info("%s is not in the registry", where)
            return None
        artifact = parse_artifact(body, where)
        manifest = _artifact_manifest(registry, artifact, dest, (name, key), settings)
        sweep_pull_staging(paths.output_dir)
        started = time.monotonic()
        log.info("pulling %s (%s in %d layer%s) from %s", dest.name, human_bytes(artifact.total), len(artifact.layers),
                 "" if len(artifact.layers) == 1 else "s", where)
        work = pull_staging(dest)
        image = _fetch_checked(registry, artifact, manifest, work, settings)
        install(image, dest, manifest.document)
        shutil.rmtree(work, ignore_errors=True)
        log.info("pulled %s in %.1f s", dest.name, time.monotonic() - started)
        return dest


def _artifact_manifest(registry: Registry, artifact: Artifact, dest: Path, wanted: tuple[str, str],
                       settings: RegistrySettings) -> Manifest:
    """The image manifest the artifact carries, refused unless it is of exactly the image asked for, adds up
    to its layers, stays under the size cap and describes a self-contained image. ``wanted``: (name, key)."""
    name, key = wanted
    where = f"{registry.remote.url}:{key}"
    config = registry.small_blob(artifact.config_digest, artifact.config_size, MAX_CONFIG_BYTES)
    try:
        manifest = Manifest.from_document(json.loads(config), Path(where))
    except ValueError:
        raise PipelineError(f"{where}: the image's manifest is not JSON; refused") from None
    total = artifact.total
    file_size = (manifest.document.get("image") or {}).get("file_size")
    if manifest.name != name or manifest.key != key or manifest.image_file != dest.name:
        raise PipelineError(f"{where}: the registry's artifact is of {manifest.name} key {manifest.key}, not "
                            f"{name} key {key}; refused", hint="cache.remote must name a repository that only "
                                                               "cloudbake pushes to")
    if manifest.image_sha256 is None or total != file_size:
        raise PipelineError(f"{where}: the layers ({human_bytes(total)}) do not add up to the image its manifest "
                            "describes; refused", hint="push the image again")
    if total > settings.max_image_bytes:
        raise PipelineError(f"{where}: the artifact's layers add up to {human_bytes(total)}, more than the "
                            f"{human_bytes(settings.max_image_bytes)} an image may be; refused before any layer "
                            "is fetched", hint="cache.remote must name a repository that only cloudbake "
                                               "pushes to")
    if manifest.document.get("image", {}).get("backing"):
        raise PipelineError(f"{where}: the artifact describes a layer over another image; refused (the registry "
                            "cache holds self-contained images only)")
    return manifest


def _fetch_checked(registry: Registry, artifact: Artifact, manifest: Manifest, work: Path,
                   settings: RegistrySettings) -> Path:
    """The layers joined in ``work/image``, matching the manifest's SHA-256 and standing alone.

    A failed digest or a refused image empties ``work``; anything else keeps what was fetched
    for the next try.
    """
    image = work / "image"
    try:
        fetch_layers(registry, artifact, work, settings)
        matches = sha256_file(image) == manifest.image_sha256
    except OSError as err:
        raise PipelineError(f"cannot write the pulled image under {work}: {err.strerror or err}",
                            hint="free space in output.dir (the pull keeps what it has for the next try)") from None
    if not matches:
        shutil.rmtree(work, ignore_errors=True)
        raise PipelineError(f"{manifest.image_file}: the pulled image does not match the SHA-256 its manifest "
                            "records; refused", hint="push the image again")
    # The registry is data from outside, like the upstream mirror: the joined image must
    # stand alone before anything (qemu-img included) opens it.
    try:
        check_standalone(image, "the pulled image", hint="the registry serves an image cloudbake did not push; "
                                                         "cache.remote must name a repository only cloudbake "
                                                         "pushes to")
        info = qemu_img_info(image)
        if info.get("format") != "qcow2" or info.get("backing-filename") or \
                (info.get("format-specific") or {}).get("data", {}).get("data-file"):
            raise PipelineError(f"{manifest.image_file} (the pulled image): qemu-img reads it as "
                                f"{str(info.get('format'))[:40]!r} naming other files; refused")
    except PipelineError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return image


def fetch_layers(registry: Registry, artifact: Artifact, work: Path, settings: RegistrySettings) -> None:
    """Every layer into its place in ``work/image``, several at once, each checked against its digest.

    No joining copy: each layer is written at its offset. A dropped connection resumes the
    layer with Range; a later pull (after Ctrl-C, a crash) keeps the layers ``work/done.json``
    lists and fetches the rest. Ctrl-C or SIGTERM ends every layer in flight at its next chunk.
    """
    work.mkdir(parents=True, exist_ok=True)
    image, record = work / "image", work / "done.json"
    layers = artifact.layers
    try:
        done = set(json.loads(record.read_text())) if image.exists() else set()
    except (OSError, ValueError, TypeError):
        done = set()
    offsets = [sum(size for _, size in layers[:index]) for index in range(len(layers))]
    total = sum(size for _, size in layers)
    progress = Progress(f"pull of {registry.remote.url}", total,
                        sum(size for index, (_, size) in enumerate(layers) if index in done), stage="registry")
    lock = threading.Lock()
    with open(image, "ab") as f:
        f.truncate(total)

    def one(index: int) -> None:
        digest, size = layers[index]
        # Each part writes through its own descriptor, closed by the part itself: a part still
        # running after the caller unwound never writes into a descriptor the caller reused.
        fd = os.open(image, os.O_WRONLY)
        try:
            fetch_layer(registry, LayerAt(digest, size, offsets[index]), fd, settings.http, progress)
        finally:
            os.close(fd)
        with lock:
            if registry.stop.is_set():
                return
            done.add(index)
            write_atomically(record, json.dumps(sorted(done)).encode())

    try:
        run_parallel(one, [index for index in range(len(layers)) if index not in done], settings.pull_parallel,
                     registry.stop)
    finally:
        progress.close()


@dataclass(frozen=True)
class LayerAt:
    """A layer of an artifact and where its bytes go in the joined file."""

    digest: str
    size: int
    offset: int


def fetch_layer(registry: Registry, layer: LayerAt, fd: int, http: HttpSettings, progress: Progress) -> None:
    """One blob into ``fd`` at its offset, hashed as it streams; a drop resumes with Range from the bytes kept."""
    digest, size, offset = layer.digest, layer.size, layer.offset
    url = registry.blob_url(digest)
    have, hasher = 0, hashlib.sha256()

    def attempt() -> None:
        nonlocal have, hasher
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        with registry.session.get(url, stream=True, headers=headers, timeout=(http.connect_timeout_s,
                                                                              http.read_timeout_s)) as response:
            if response.status_code == 200 and have:
                progress.update(-have)
                have, hasher = 0, hashlib.sha256()   # no range support: from the start
            elif response.status_code not in (200, 206):
                registry.fail(response, f"blob {digest[:19]}")
            floor = RateFloor(url, http)
            for chunk in body_chunks(response):
                if registry.stop.is_set():
                    raise TransferStoppedError()
                if have + len(chunk) > size:
                    raise PipelineError(f"{url}: the registry sent more than the {human_bytes(size)} the manifest "
                                        "announces; refused")
                os.pwrite(fd, chunk, offset + have)
                hasher.update(chunk)
                have += len(chunk)
                progress.update(len(chunk))
                floor.add(len(chunk))
        if have < size:
            raise requests.exceptions.ChunkedEncodingError(f"connection closed after {human_bytes(have)}")

    with_retries(attempt, url, http)
    actual = "sha256:" + hasher.hexdigest()
    if actual != digest:
        raise PipelineError(f"{url}: SHA-256 mismatch: the blob's bytes hash to {actual[:19]}…; refused",
                            hint="the registry holds a corrupted copy: push the image again")


def try_pull(remote: RemoteCache, paths: Paths, name: str, key: str,
             settings: RegistrySettings | None = None) -> Path | None:
    """Pull before baking: any failure (registry down, refused, corrupt) is a warning, and the caller bakes."""
    try:
        return pull_image(remote, paths, name, key, settings)
    except PipelineError as err:
        log.warning("cannot pull from %s: %s; baking instead", remote.url, err.message)
        return None
