"""The registry's auth handshake, bound to the registry's origin: Basic or a bearer token from the
realm a 401 names, never sent to another origin, never over plain HTTP except to loopback, and no
https-to-http redirect followed.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import threading
import urllib.parse
from typing import Any

import requests

from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger, strip_credentials
from cloudbake.remote.credentials import Credentials
from cloudbake.source.http import HttpSettings, make_session, read_body

log = stage_logger("registry")

# A token answer is a few KiB; more is refused unread.
MAX_TOKEN_BYTES = 1 << 20


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
                    hint=credentials_hint(creds))
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


def credentials_hint(creds: Credentials | None) -> str:
    if creds is None:
        return ("set CLOUDBAKE_REGISTRY_USERNAME and CLOUDBAKE_REGISTRY_PASSWORD, run docker login, or (ghcr.io "
                "in GitHub Actions) pass GITHUB_TOKEN")
    return (f"check the credentials from {creds.source}; a token needs the right scope (ghcr.io: "
            "write:packages to push, read:packages to pull)")


