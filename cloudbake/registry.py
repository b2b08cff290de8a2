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
retry loop of cloudbake.http, which already does resumable, digest-checked downloads. The
`oras` Python SDK is used by the tests to check interoperability; it has no Range resume or
chunked-upload resume, which CI fleets need.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from cloudbake.errors import PipelineError
from cloudbake.files import file_lock, sha256_file, write_atomically
from cloudbake.http import (
    UNPINNED_MAX_BYTES,
    HttpSettings,
    Progress,
    RateFloor,
    ServerError,
    TransferStoppedError,
    body_chunks,
    make_session,
    read_body,
    run_parallel,
    with_retries,
)
from cloudbake.log import stage_logger, strip_credentials
from cloudbake.paths import Paths
from cloudbake.pipeline import RemoteCache
from cloudbake.qcow2 import check_standalone
from cloudbake.runner import run
from cloudbake.store import (
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
from cloudbake.units import human_bytes

log = stage_logger("registry")

ARTIFACT_TYPE = "application/vnd.cloudbake.image.v1"
CONFIG_TYPE = "application/vnd.cloudbake.manifest.v1+json"
LAYER_TYPE = "application/vnd.cloudbake.image.qcow2.part.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
KEY_ANNOTATION = "dev.cloudbake.key"

# What a registry may send before it is refused: a manifest names at most a few thousand
# layers; the config is an image manifest of a few KiB.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 4096
MAX_TOKEN_BYTES = 1 << 20
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


# --- credentials -----------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)
    source: str = ""   # where they came from, for messages; never the secret itself

    @property
    def is_identity_token(self) -> bool:
        """Docker's convention for an OAuth2 refresh token instead of a password."""
        return self.username == "<token>"


def resolve_credentials(registry: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for ``registry``: the environment first, then Docker's config; None means anonymous.

    ``CLOUDBAKE_REGISTRY_USERNAME``/``CLOUDBAKE_REGISTRY_PASSWORD`` win; for ghcr.io,
    ``GITHUB_TOKEN`` (as a GitHub Actions job has it); then ``$DOCKER_CONFIG/config.json``
    or ``~/.docker/config.json``: ``credHelpers`` for this registry, ``auths``, ``credsStore``.
    """
    env = os.environ if env is None else env
    password = env.get("CLOUDBAKE_REGISTRY_PASSWORD")
    if password:
        return Credentials(env.get("CLOUDBAKE_REGISTRY_USERNAME") or "cloudbake", password,
                           "CLOUDBAKE_REGISTRY_PASSWORD")
    if registry == "ghcr.io" and env.get("GITHUB_TOKEN"):
        return Credentials(env.get("GITHUB_ACTOR") or "cloudbake", env["GITHUB_TOKEN"], "GITHUB_TOKEN")
    return docker_config_credentials(registry, env)


def docker_config_path(env: Mapping[str, str]) -> Path:
    folder = env.get("DOCKER_CONFIG") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".docker")
    return Path(folder) / "config.json"


def _auth_host(key: str) -> str:
    """The registry an ``auths`` key names: ``https://index.docker.io/v1/`` -> ``index.docker.io``."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


# Docker Hub is spelt three ways; its credentials are stored under the index's URL.
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def docker_config_credentials(registry: str, env: Mapping[str, str]) -> Credentials | None:
    path = docker_config_path(env)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: cannot read Docker's config ({type(err).__name__})",
                            hint="fix or remove the file, or set CLOUDBAKE_REGISTRY_USERNAME and "
                                 "CLOUDBAKE_REGISTRY_PASSWORD") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: not a Docker config (a JSON object)")
    wanted = {registry} | (_DOCKER_HUB if registry in _DOCKER_HUB else set())
    helpers = config.get("credHelpers") or {}
    for host, helper in (helpers.items() if isinstance(helpers, dict) else ()):
        if _auth_host(host) in wanted and isinstance(helper, str):
            return helper_credentials(helper, registry)
    auths = config.get("auths") or {}
    for host, entry in (auths.items() if isinstance(auths, dict) else ()):
        if _auth_host(host) not in wanted or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
            return Credentials("<token>", entry["identitytoken"], f"{path} (identitytoken)")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except ValueError:
                sep = ""
            if not sep:
                raise PipelineError(f"{path}: the 'auth' entry for {host} is not base64 of user:password",
                                    hint=f"run docker login {registry} again")
            return Credentials(user, secret, str(path))
        if isinstance(entry.get("password"), str) and entry["password"]:
            return Credentials(str(entry.get("username") or ""), entry["password"], str(path))
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return helper_credentials(store, registry)
    return None


def helper_credentials(helper: str, registry: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` (Docker's credential helper protocol)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise PipelineError(f"Docker config names a credential helper {helper!r} that is not a program name")
    program = f"docker-credential-{helper}"
    if shutil.which(program) is None:
        raise PipelineError(f"Docker's config wants the credential helper {program}, which is not on PATH",
                            hint=f"install {program}, or set CLOUDBAKE_REGISTRY_USERNAME and "
                                 "CLOUDBAKE_REGISTRY_PASSWORD")
    result = run([program, "get"], stage="registry", timeout=60, check=False, input=registry.encode())
    if result.returncode != 0:
        if "credentials not found" in (result.stdout + result.stderr).lower():
            return None
        # The helper's output may hold a secret: say only that it failed.
        raise PipelineError(f"{program} get failed with exit status {result.returncode}",
                            hint=f"check {program} by hand: echo {registry} | {program} get")
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"{program} get did not answer with JSON holding Username and Secret") from None
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        return None
    return Credentials(username, secret, program)


# --- authentication ------------------------------------------------------------------


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="repository:a/b:pull,push"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {name.lower(): value for name, value in re.findall(r'([A-Za-z_]+)\s*=\s*"([^"]*)"', rest)}
    return scheme.lower(), params


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``: what credentials are bound to."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def describe_origin(found: tuple[str, str, int]) -> str:
    return f"{found[0]}://{found[1]}:{found[2]}"


class RegistryAuth(requests.auth.AuthBase):
    """Anonymous first; a 401 is answered once (Basic, or a Bearer token from the realm) and the request resent.

    Credentials and tokens are bound to the registry's origin (scheme, host, port): the
    header goes only on requests to it, a challenge from any other origin (a blob redirect to
    storage that answers 401) is an error and never answered, and a redirect that would
    downgrade to plain HTTP is refused. With credentials, every request to the registry must
    go over TLS or to loopback, not only the one that answers a 401.

    Every request this module sends has a body of bytes or none, so it can be sent again.
    Tokens expire: a later 401 fetches a new one.
    """

    def __init__(self, credentials: Credentials | None, verify: bool | str, http: HttpSettings,
                 registry_url: str = "") -> None:
        self.credentials, self.verify, self.http = credentials, verify, http
        self.origin = origin(registry_url) if registry_url else None
        self.header: str | None = None
        self.lock = threading.Lock()

    def is_registry(self, url: str) -> bool:
        return self.origin is None or origin(url) == self.origin

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        url = request.url or ""
        if self.is_registry(url):
            if self.credentials is not None or self.header:
                self._check_channel(url)
            if self.header:
                request.headers["Authorization"] = self.header
        else:
            request.headers.pop("Authorization", None)
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.is_redirect:
            self._check_redirect(response)
        if response.status_code != 401 or getattr(response.request, "cloudbake_answered", False):
            return response
        if not self.is_registry(response.url):
            response.close()
            assert self.origin is not None
            raise PipelineError(f"{describe_origin(origin(response.url))} asked for credentials (401) while "
                                f"serving the registry {describe_origin(self.origin)}; not answered: credentials "
                                "go to the registry's own origin only",
                                hint="the registry redirects to storage that wants its own credentials; fix the "
                                     "registry's storage settings")
        with self.lock:
            header = self._answer(response.headers.get("WWW-Authenticate", ""), response.url)
        if header is None:
            return response
        self.header = header
        response.content  # noqa: B018  (read the body so the connection can be reused)
        response.close()
        again = response.request.copy()
        again.headers["Authorization"] = header
        again.cloudbake_answered = True  # type: ignore[attr-defined]
        resent: requests.Response = response.connection.send(again, **kwargs)
        resent.history.append(response)
        resent.request = again
        return resent

    def _check_redirect(self, response: requests.Response) -> None:
        target = urllib.parse.urljoin(response.url, response.headers.get("Location", ""))
        check_no_downgrade(response.url, target)

    def _check_channel(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" and not is_loopback(parts.hostname or ""):
            raise PipelineError(f"refusing to send registry credentials over plain HTTP to {parts.netloc}",
                                hint="use TLS (drop cache.plain_http), or a registry on this machine")

    def _answer(self, challenge: str, url: str) -> str | None:
        scheme, params = parse_challenge(challenge)
        creds = self.credentials
        if scheme == "basic":
            if creds is None or creds.is_identity_token:
                return None
            self._check_channel(url)
            return "Basic " + base64.b64encode(f"{creds.username}:{creds.secret}".encode()).decode()
        if scheme == "bearer" and params.get("realm", "").startswith(("https://", "http://")):
            return "Bearer " + self._token(params)
        return None

    def _token(self, params: dict[str, str]) -> str:
        realm = params["realm"]
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        creds = self.credentials
        session = make_session()
        timeout = (self.http.connect_timeout_s, self.http.read_timeout_s)
        if creds is not None:
            self._check_channel(realm)
        try:
            if creds is not None and creds.is_identity_token:
                response = session.post(realm, timeout=timeout, verify=self.verify, stream=True, data={
                    **query, "grant_type": "refresh_token", "refresh_token": creds.secret, "client_id": "cloudbake"})
            else:
                response = session.get(realm, params=query, timeout=timeout, verify=self.verify, stream=True,
                                       auth=(creds.username, creds.secret) if creds is not None else None)
        except requests.RequestException as err:
            raise PipelineError(f"the registry's token service {strip_credentials(realm)} is unreachable "
                                f"({type(err).__name__})") from None
        with response:
            if response.status_code in (401, 403):
                raise PipelineError(
                    f"the registry's token service {realm} refused "
                    + (f"the credentials from {creds.source}" if creds else "anonymous access")
                    + f" ({response.status_code})",
                    hint=_credentials_hint(creds))
            if response.status_code >= 400:
                raise PipelineError(f"the registry's token service {realm} answered {response.status_code}")
            body = read_body(response, MAX_TOKEN_BYTES, strip_credentials(realm), self.http)
        try:
            answer = json.loads(body) if len(body) <= MAX_TOKEN_BYTES else None
            token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise PipelineError(f"the registry's token service {realm} answered without a token")
        return token


def check_no_downgrade(source: str, target: str) -> None:
    """A registry on TLS may send us elsewhere (blob storage, an upload session), never to plain HTTP."""
    if urllib.parse.urlsplit(source).scheme == "https" and urllib.parse.urlsplit(target).scheme != "https":
        raise PipelineError(f"{strip_credentials(source)} sent cloudbake to {strip_credentials(target)[:200]}, "
                            "plain HTTP; refused (the registry is spoken to over TLS only)",
                            hint="a proxy or the registry's settings rewrite its URLs to http://; fix its "
                                 "external URL (distribution: http.host)")


def _credentials_hint(creds: Credentials | None) -> str:
    if creds is None:
        return ("set CLOUDBAKE_REGISTRY_USERNAME and CLOUDBAKE_REGISTRY_PASSWORD, run docker login, or (ghcr.io "
                "in GitHub Actions) pass GITHUB_TOKEN")
    return (f"check the credentials from {creds.source}; a token needs the right scope (ghcr.io: "
            "write:packages to push, read:packages to pull)")


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


def _registry_errors(response: requests.Response) -> str:
    """The registry's own error codes and messages (its JSON error body), briefly."""
    try:
        body = json.loads(response.raw.read(64 << 10, decode_content=True) if response.raw else b"")
        errors = body.get("errors") if isinstance(body, dict) else None
        if not isinstance(errors, list):
            return ""
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}"[:200] for e in errors[:3]
                         if isinstance(e, dict))
        return "".join(c for c in text if c.isprintable())   # a registry's words, never its escape sequences
    except (ValueError, AttributeError, requests.RequestException):
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
        detail = _registry_errors(response)
        response.close()
        suffix = f": {detail}" if detail else ""
        if code == 429 or code >= 500:
            raise ServerError(f"{self.remote.registry} answered {code} to {what}{suffix}")
        if code == 401:
            raise PipelineError(f"{self.remote.registry} wants credentials for {what} (401){suffix}",
                                hint=_credentials_hint(self.credentials))
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


def parse_artifact(body: bytes, where: str) -> Artifact:
    """Refuse anything that is not a cloudbake image artifact, before a byte of it is fetched."""
    def refuse(why: str) -> PipelineError:
        return PipelineError(f"{where}: not a cloudbake image ({why}); refused",
                             hint="cache.remote must name a repository that only cloudbake pushes to")
    try:
        doc = json.loads(body)
    except ValueError:
        raise refuse("the manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise refuse("the manifest is not a JSON object")
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
        config = registry.small_blob(artifact.config_digest, artifact.config_size, MAX_CONFIG_BYTES)
        try:
            manifest = Manifest.from_document(json.loads(config), Path(where))
        except ValueError:
            raise PipelineError(f"{where}: the image's manifest is not JSON; refused") from None
        total = sum(size for _, size in artifact.layers)
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
        sweep_pull_staging(paths.output_dir)
        started = time.monotonic()
        log.info("pulling %s (%s in %d layer%s) from %s", dest.name, human_bytes(total), len(artifact.layers),
                 "" if len(artifact.layers) == 1 else "s", where)
        work = pull_staging(dest)
        image = work / "image"
        try:
            fetch_layers(registry, artifact, work, settings)
            matches = sha256_file(image) == manifest.image_sha256
        except OSError as err:
            raise PipelineError(f"cannot write the pulled image under {work}: {err.strerror or err}",
                                hint="free space in output.dir (the pull keeps what it has for the next try)") from None
        if not matches:
            shutil.rmtree(work, ignore_errors=True)
            raise PipelineError(f"{dest.name}: the pulled image does not match the SHA-256 its manifest records; "
                                "refused", hint="push the image again")
        # The registry is data from outside, like the upstream mirror: the joined image must
        # stand alone before anything (qemu-img included) opens it.
        try:
            check_standalone(image, "the pulled image", hint="the registry serves an image cloudbake did not push; "
                                                             "cache.remote must name a repository only cloudbake "
                                                             "pushes to")
            info = qemu_img_info(image)
            if info.get("format") != "qcow2" or info.get("backing-filename") or \
                    (info.get("format-specific") or {}).get("data", {}).get("data-file"):
                raise PipelineError(f"{dest.name} (the pulled image): qemu-img reads it as "
                                    f"{str(info.get('format'))[:40]!r} naming other files; refused")
        except PipelineError:
            shutil.rmtree(work, ignore_errors=True)
            raise
        install(image, dest, manifest.document)
        shutil.rmtree(work, ignore_errors=True)
        log.info("pulled %s in %.1f s", dest.name, time.monotonic() - started)
        return dest


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
            fetch_layer(registry, digest, size, fd, offsets[index], settings.http, progress)
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


def fetch_layer(registry: Registry, digest: str, size: int, fd: int, offset: int, http: HttpSettings,
                progress: Progress) -> None:
    """One blob into ``fd`` at ``offset``, hashed as it streams; a drop resumes with Range from the bytes kept."""
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
