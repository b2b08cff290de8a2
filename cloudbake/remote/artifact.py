"""The artifact format: an OCI image manifest in the ORAS style whose config is the image's manifest
and whose layers are the qcow2 cut in fixed-size parts, and the checks on one read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger, strip_credentials
from cloudbake.core.runner import run
from cloudbake.remote.client import DIGEST, MANIFEST_TYPE, MAX_LAYERS, Blob

log = stage_logger("registry")


ARTIFACT_TYPE = "application/vnd.cloudbake.image.v1"
CONFIG_TYPE = "application/vnd.cloudbake.manifest.v1+json"
LAYER_TYPE = "application/vnd.cloudbake.image.qcow2.part.v1"
KEY_ANNOTATION = "dev.cloudbake.key"
DISTRO_ANNOTATION = "dev.cloudbake.distro"


# --- the artifact ----------------------------------------------------------------------


def plan_layers(image: Path, layer_bytes: int) -> list[Blob]:
    """The image cut into ``layer_bytes`` pieces, each hashed (one pass over the file)."""
    size = image.stat().st_size
    count = max(1, -(-size // layer_bytes))
    blobs = []
    with open(image, "rb") as f:
        for index in range(count):
            offset = index * layer_bytes
            length = min(layer_bytes, size - offset)
            digest = hashlib.sha256()
            left = length
            while left:
                chunk = f.read(min(16 << 20, left))
                if not chunk:
                    raise PipelineError(f"{image} shrank while it was read")
                digest.update(chunk)
                left -= len(chunk)
            title = image.name if count == 1 else f"{image.name}.part{index:04d}"
            blobs.append(Blob(f"sha256:{digest.hexdigest()}", length, path=image, offset=offset, title=title))
    return blobs


def provenance(pipeline_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where the pipeline's code comes from: GitHub Actions' variables, else git; credentials stripped."""
    env = os.environ if env is None else env
    found: dict[str, str] = {}
    if env.get("GITHUB_SERVER_URL") and env.get("GITHUB_REPOSITORY"):
        found["org.opencontainers.image.source"] = f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_REPOSITORY']}"
    if env.get("GITHUB_SHA"):
        found["org.opencontainers.image.revision"] = env["GITHUB_SHA"]
    for name, argv in (("org.opencontainers.image.source", ["git", "remote", "get-url", "origin"]),
                       ("org.opencontainers.image.revision", ["git", "rev-parse", "HEAD"])):
        if name in found or shutil.which("git") is None:
            continue
        try:
            done = run(argv, stage="registry", timeout=30, check=False, cwd=pipeline_dir)
        except PipelineError:
            continue
        if done.returncode == 0 and done.stdout.strip():
            found[name] = strip_credentials(done.stdout.strip())
    return found


def artifact_manifest(config: Blob, layers: list[Blob], annotations: dict[str, str]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config.descriptor(CONFIG_TYPE),
        "layers": [layer.descriptor(LAYER_TYPE) for layer in layers],
        "annotations": annotations,
    }
    return json.dumps(document, indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class Artifact:
    """A pulled manifest, checked: the config's descriptor and the layers in order."""

    config_digest: str
    config_size: int
    layers: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """The image's size: its layers' sizes added up."""
        return sum(size for _, size in self.layers)


def refusal(where: str, what: str) -> Callable[[str], PipelineError]:
    """The error for a registry's answer that is not a cloudbake ``what`` (image, warm set), and why."""
    def refuse(why: str) -> PipelineError:
        return PipelineError(f"{where}: not a cloudbake {what} ({why}); refused",
                             hint="cache.remote must name a repository that only cloudbake pushes to")
    return refuse


def manifest_document(body: bytes, refuse: Callable[[str], PipelineError]) -> dict[str, Any]:
    """A pulled OCI manifest as a JSON object, or a refusal."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise refuse("the manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise refuse("the manifest is not a JSON object")
    return doc


def parse_artifact(body: bytes, where: str) -> Artifact:
    """Refuse anything that is not a cloudbake image artifact, before a byte of it is fetched."""
    refuse = refusal(where, "image")
    doc = manifest_document(body, refuse)
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise refuse(f"artifactType {str(doc.get('artifactType'))[:80]!r}")
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_TYPE:
        raise refuse("its config is not a cloudbake manifest")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise refuse("no layers, or too many")

    def descriptor(item: Any, media_type: str) -> tuple[str, int]:
        if not isinstance(item, dict) or item.get("mediaType") != media_type:
            raise refuse(f"a descriptor is not of type {media_type}")
        digest, size = item.get("digest"), item.get("size")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise refuse("a digest is not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise refuse("a size is not a whole number of bytes")
        return digest, size

    config_digest, config_size = descriptor(config, CONFIG_TYPE)
    return Artifact(config_digest, config_size, tuple(descriptor(item, LAYER_TYPE) for item in layers))


