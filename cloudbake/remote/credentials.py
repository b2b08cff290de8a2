"""Registry credentials, found the way docker and oras find them: ``CLOUDBAKE_REGISTRY_*`` variables,
then ``~/.docker/config.json`` (``auths``, ``credHelpers``, ``credsStore``) and its credential helpers.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.runner import run

log = stage_logger("registry")


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


