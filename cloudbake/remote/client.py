"""The registry API (distribution spec v1.1) over the one HTTP session and retry loop: blobs (HEAD,
ranged GET, monolithic or chunked resumable upload), manifests, and the limits on what a
registry may send before it is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from cloudbake.config.model import RemoteCache
from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.units import human_bytes
from cloudbake.remote.auth import RegistryAuth, check_no_downgrade, credentials_hint, is_loopback
from cloudbake.remote.credentials import Credentials
from cloudbake.source.http import (
    UNPINNED_MAX_BYTES,
    HttpSettings,
    Progress,
    ServerError,
    TransferStoppedError,
    make_session,
    read_body,
    with_retries,
)

log = stage_logger("registry")

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"


# What a registry may send before it is refused: a manifest names at most a few thousand
# layers; the config is an image manifest of a few KiB.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 4096
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class RegistrySettings:
    """How images are cut and moved; tests make the pieces small."""

    # One layer per this many bytes of qcow2: the unit a pull fetches in parallel and resumes.
    layer_bytes: int = 128 << 20
    # A blob up to this size is uploaded in one PUT; a larger one in PATCH chunks of this size,
    # resumable from what the registry says it has.
    upload_chunk_bytes: int = 16 << 20
    pull_parallel: int = 4   # layers moved at once, pushing and pulling
    # A manifest whose layers add up to more is refused before a layer is fetched (the cap
    # on a download whose size nothing pinned).
    max_image_bytes: int = UNPINNED_MAX_BYTES
    http: HttpSettings = field(default_factory=HttpSettings)



# --- the registry API ------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Bytes to upload: in memory (the config) or a range of a file (a layer)."""

    digest: str
    size: int
    path: Path | None = None
    offset: int = 0
    data: bytes = b""
    title: str = ""

    def read(self, start: int, length: int) -> bytes:
        if self.path is None:
            return self.data[start:start + length]
        with open(self.path, "rb") as f:
            f.seek(self.offset + start)
            return f.read(length)

    def descriptor(self, media_type: str) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": media_type, "digest": self.digest, "size": self.size}
        if self.title:
            desc["annotations"] = {TITLE: self.title}
        return desc


# An error body is a few hundred bytes of JSON; more is not read.
ERROR_BODY_MAX_BYTES = 16 << 10


def _registry_errors(response: requests.Response, http: HttpSettings) -> str:
    """The registry's own error codes and messages (its JSON error body), briefly. Read like every other
    body: size-capped and under the rate floor, so an error body sent a byte a second cannot stall a pull."""
    try:
        body = json.loads(read_body(response, ERROR_BODY_MAX_BYTES, response.url, http) if response.raw else b"")
        errors = body.get("errors") if isinstance(body, dict) else None
        if not isinstance(errors, list):
            return ""
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}"[:200] for e in errors[:3]
                         if isinstance(e, dict))
        return "".join(c for c in text if c.isprintable())   # a registry's words, never its escape sequences
    except (ValueError, AttributeError, requests.RequestException, ServerError):
        return ""


class Registry:
    """One repository of one registry, over the OCI distribution API."""

    def __init__(self, remote: RemoteCache, settings: RegistrySettings | None = None,
                 credentials: Credentials | None = None) -> None:
        self.remote = remote
        self.settings = settings or RegistrySettings()
        self.http = self.settings.http
        scheme = "http" if remote.plain_http else "https"
        self.api = f"{scheme}://{remote.registry}/v2/{remote.repository}"
        self.credentials = credentials
        verify = str(remote.ca_file) if remote.ca_file else True
        self.session = make_session(verify)
        self.session.auth = RegistryAuth(credentials, verify, self.http, self.api)
        self.stop = threading.Event()   # set on Ctrl-C, SIGTERM or a failed part: every transfer ends

    def _timeout(self) -> tuple[float, float]:
        return (self.http.connect_timeout_s, self.http.read_timeout_s)

    def request(self, method: str, url: str, what: str, ok: tuple[int, ...], **kwargs: Any) -> requests.Response:
        """One request with the retry loop; a status outside ``ok`` (and not retryable) is a clear error.

        Bodies are streamed, so whatever reads one caps how much it takes.
        """
        kwargs.setdefault("stream", True)

        def attempt() -> requests.Response:
            try:
                response = self.session.request(method, url, timeout=self._timeout(), **kwargs)
            except requests.exceptions.SSLError as err:
                reason = _ssl_reason(err)
                local = is_loopback(urllib.parse.urlsplit("//" + self.remote.registry).hostname or "")
                if "plain HTTP" in reason:
                    hint = ("set cache.plain_http: true (a registry on this machine may speak plain HTTP; "
                            "credentials still go to loopback only)" if local
                            else "give the registry TLS, or set cache.plain_http: true for anonymous use")
                elif not self.remote.ca_file:
                    hint = "set cache.ca_file to the CA that signed the registry's certificate"
                else:
                    hint = f"{self.remote.ca_file} does not vouch for this registry's certificate"
                raise PipelineError(f"{self.remote.registry}: TLS verification failed ({reason})",
                                    hint=hint) from None
            if response.status_code in ok:
                return response
            self.fail(response, what)
            raise AssertionError("unreachable")
        return with_retries(attempt, f"{self.remote.url} ({what})", self.http)

    def fail(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        detail = _registry_errors(response, self.http)
        response.close()
        suffix = f": {detail}" if detail else ""
        if code == 429 or code >= 500:
            raise ServerError(f"{self.remote.registry} answered {code} to {what}{suffix}")
        if code == 401:
            raise PipelineError(f"{self.remote.registry} wants credentials for {what} (401){suffix}",
                                hint=credentials_hint(self.credentials))
        if code == 403:
            raise PipelineError(f"{self.remote.registry} denied {what} (403){suffix}",
                                hint=f"the credentials{' from ' + self.credentials.source if self.credentials else ''}"
                                     f" may read but not write {self.remote.repository}, or not see it at all")
        if code == 404:
            raise PipelineError(f"{self.remote.url}: {what}: not found (404){suffix}",
                                hint="check cache.remote (the registry and the repository path)")
        raise PipelineError(f"{self.remote.registry} answered {code} {response.reason} to {what}{suffix}")

    def blob_url(self, digest: str) -> str:
        return f"{self.api}/blobs/{digest}"

    def has_blob(self, blob: Blob) -> bool:
        response = self.request("HEAD", self.blob_url(blob.digest), f"HEAD of blob {blob.digest[:19]}", (200, 404))
        response.close()
        if response.status_code != 200:
            return False
        length = response.headers.get("Content-Length", "")
        return not length.isdigit() or int(length) == blob.size

    def fetch_body(self, url: str, what: str, ok: tuple[int, ...], limit: int,
                   **kwargs: Any) -> tuple[requests.Response, bytes]:
        """GET a small body (a manifest, the config) with retries, under the rate floor; at most ``limit`` + 1 bytes."""
        def attempt() -> tuple[requests.Response, bytes]:
            response = self.request("GET", url, what, ok, stream=True, **kwargs)
            with response:
                if response.status_code not in (200, 206):
                    return response, b""
                return response, read_body(response, limit, url, self.http)
        return with_retries(attempt, f"{self.remote.url} ({what})", self.http)

    def manifest(self, reference: str) -> bytes | None:
        """The manifest tagged ``reference``, or None when there is none."""
        url = f"{self.api}/manifests/{reference}"
        response, body = self.fetch_body(url, f"the manifest {reference}", (200, 404), MAX_MANIFEST_BYTES,
                                         headers={"Accept": MANIFEST_TYPE})
        if response.status_code == 404:
            return None
        if len(body) > MAX_MANIFEST_BYTES:
            raise PipelineError(f"{self.remote.url}: the manifest {reference} is larger than "
                                f"{human_bytes(MAX_MANIFEST_BYTES)}; refused")
        sent = response.headers.get("Docker-Content-Digest")
        if sent and DIGEST.fullmatch(sent) and sent != "sha256:" + hashlib.sha256(body).hexdigest():
            raise PipelineError(f"{self.remote.url}: the manifest {reference} does not match the digest the "
                                "registry announces; refused")
        return body

    def small_blob(self, digest: str, size: int, limit: int) -> bytes:
        if size > limit:
            raise PipelineError(f"{self.remote.url}: blob {digest[:19]} announces {human_bytes(size)}, more than "
                                f"{human_bytes(limit)}; refused")
        _, body = self.fetch_body(self.blob_url(digest), f"blob {digest[:19]}", (200,), limit)
        if len(body) != size or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise PipelineError(f"{self.remote.url}: blob {digest[:19]} does not match its digest or size; refused",
                                hint="the registry holds a corrupted copy: push the image again")
        return body

    def upload(self, blob: Blob, progress: Progress) -> bool:
        """Upload ``blob`` unless the registry has it; True when bytes went up."""
        if self.has_blob(blob):
            log.info("%s: already in the registry", blob.title or blob.digest[:19])
            progress.update(blob.size)
            return False
        if blob.size <= self.settings.upload_chunk_bytes:
            def whole() -> None:
                location = self._start_upload()
                self.request("PUT", _with_digest(location, blob.digest), f"upload of {blob.title or 'the config'}",
                             (201,), data=blob.read(0, blob.size),
                             headers={"Content-Type": "application/octet-stream"}).close()
            with_retries(whole, self.remote.url, self.http)
            progress.update(blob.size)
            return True
        self._upload_chunked(blob, progress)
        return True

    def _start_upload(self) -> str:
        response = self.request("POST", f"{self.api}/blobs/uploads/", "starting an upload", (202,),
                                headers={"Content-Length": "0"})
        response.close()
        return self._location(response)

    def _location(self, response: requests.Response) -> str:
        """Where an upload goes on: the registry's Location, never a downgrade to plain HTTP.

        A Location on another origin is followed without credentials (RegistryAuth binds them).
        """
        location = response.headers.get("Location")
        if not location:
            raise PipelineError(f"{response.url}: the registry answered {response.status_code} without a Location")
        target = urllib.parse.urljoin(response.url, location)
        check_no_downgrade(self.api, target)
        return target

    def _upload_status(self, location: str, confirmed: int) -> int | None:
        """How many bytes the registry holds of an unfinished upload; None if it forgot the upload.

        ``confirmed`` is what its answers to our PATCHes acknowledged: distribution says
        ``Range: 0-0`` both for nothing and for one byte, so with nothing confirmed it means nothing.
        """
        response = self.session.get(location, timeout=self._timeout(), stream=True)
        if response.status_code == 404:
            response.close()
            return None
        if response.status_code != 204:
            self.fail(response, "checking an unfinished upload")
        response.close()
        match = re.fullmatch(r"(?:bytes=)?0-(\d+)", response.headers.get("Range", "").strip())
        if not match or (match.group(1) == "0" and confirmed == 0):
            return 0
        return int(match.group(1)) + 1

    def _upload_chunked(self, blob: Blob, progress: Progress) -> None:
        """PATCH the blob in chunks; after a drop, ask the registry how far it got and go on from there."""
        state: dict[str, Any] = {"location": None, "offset": 0}

        def attempt() -> None:
            if state["location"] is not None:
                have = self._upload_status(state["location"], state["offset"])
                if have is None:
                    state["location"] = None
                elif have != state["offset"]:
                    log.info("%s: resuming the upload at %s", blob.title, human_bytes(have))
                    progress.update(have - state["offset"])
                    state["offset"] = have
            if state["location"] is None:
                state["location"], state["offset"] = self._start_upload(), 0
            while state["offset"] < blob.size:
                if self.stop.is_set():
                    raise TransferStoppedError()
                start = state["offset"]
                length = min(self.settings.upload_chunk_bytes, blob.size - start)
                response = self.session.patch(state["location"], data=blob.read(start, length),
                                              timeout=self._timeout(), stream=True, headers={
                                                  "Content-Type": "application/octet-stream",
                                                  "Content-Range": f"{start}-{start + length - 1}"})
                if response.status_code != 202:
                    self.fail(response, f"upload of {blob.title}")   # reads the registry's reason, then closes
                response.close()
                state["location"] = self._location(response)
                state["offset"] = start + length
                progress.update(length)
            self.request("PUT", _with_digest(state["location"], blob.digest), f"completing {blob.title}", (201,),
                         headers={"Content-Length": "0"}).close()

        with_retries(attempt, f"{self.remote.url} (upload of {blob.title})", self.http)

    def put_manifest(self, reference: str, body: bytes) -> None:
        self.request("PUT", f"{self.api}/manifests/{reference}", f"tagging {reference}", (201,), data=body,
                     headers={"Content-Type": MANIFEST_TYPE}).close()


def _ssl_reason(err: Exception) -> str:
    text = str(err)
    if re.search(r"WRONG_VERSION_NUMBER|record layer failure|unknown protocol|http request", text, re.I):
        return "the registry speaks plain HTTP, not TLS"
    match = re.search(r"certificate verify failed: ([^(\]')]+)", text)
    return match.group(1).strip() if match else "the certificate is not trusted"


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})


