"""The NoCloud seed: validated cloud-config, merged with what the pipeline adds, in a reproducible ISO.

The merge (documented in docs/seed.md):
- ``users``: the user's list is kept as written; the pipeline's ``cloud_init.user`` is
  added with passwordless sudo unless the user-data already defines that name, in
  which case only the pipeline's SSH keys are added to it (the user's fields win).
- ``power_state`` (bake only): cloudbake powers the guest off when cloud-init is
  done. A user ``power_state`` must use ``mode: poweroff``; its ``delay``,
  ``message`` and ``timeout`` are kept; its ``condition`` is refused, because the
  condition is where cloudbake reports cloud-init's result and generalizes the guest.
- Everything else is the user's, untouched.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import glob
import hashlib
import io
import json
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import struct_time
from typing import Any

import jsonschema
import pycdlib
import yaml

from cloudbake.config.distros import facts
from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths
from cloudbake.config.problems import schema_problems
from cloudbake.config.schemas import cloud_config_schema_path
from cloudbake.config.yamlfile import Problem, dotted, locate, parse_yaml, suggest
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import write_atomically
from cloudbake.core.log import stage_logger
from cloudbake.core.runner import guest_path, run
from cloudbake.image.cacerts import certificates_for
from cloudbake.image.profile import profile_script

# Top-level keys cloud-init reads that its 22.4 schema does not describe.
UNDESCRIBED_KEYS = ("network", "merge_how", "merge_type", "_log", "datasource_list", "vendor_data")
CLOUD_CONFIG_HEADER = "#cloud-config"
SUDO_NOPASSWD = "ALL=(ALL) NOPASSWD:ALL"
# Markers the bake reads back from the serial console.
RESULT_MARKER = "CLOUDBAKE-RESULT"
STATUS_MARKER = "CLOUDBAKE-STATUS"
GENERALIZED_MARKER = "CLOUDBAKE-GENERALIZED"
SCHEMA_MARKER = "CLOUDBAKE-SCHEMA"
# What the guest's cloud-init logs when the user-data fails its own schema check (22.x to 26.x wordings).
GUEST_SCHEMA_WARNING = "Invalid cloud-config provided|failed schema validation"
# Every marker carries a nonce fresh for each boot, so the host never believes lines
# another boot printed (an orphaned QEMU, an old log). The seed the key is computed from
# holds this placeholder; the ISO a boot uses holds that boot's nonce instead.
BOOT_NONCE_PLACEHOLDER = "CLOUDBAKE_BOOT_NONCE"
# 2000-01-01T00:00:00Z: the ISO's dates when SOURCE_DATE_EPOCH is not set.
DEFAULT_SOURCE_DATE_EPOCH = 946684800

log = stage_logger("seed")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning about the user's files, once per process however many stages look at them."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


@dataclass(frozen=True)
class SeedFiles:
    """The files of a NoCloud seed, as bytes, by their name in the ISO."""

    user_data: bytes
    meta_data: bytes
    network_config: bytes | None = None
    vendor_data: bytes | None = None

    def items(self) -> list[tuple[str, bytes]]:
        files = [("user-data", self.user_data), ("meta-data", self.meta_data)]
        if self.network_config is not None:
            files.append(("network-config", self.network_config))
        if self.vendor_data is not None:
            files.append(("vendor-data", self.vendor_data))
        return files


# --- reading and checking user-data ------------------------------------------------


@functools.cache
def load_cloud_config_schema() -> dict[str, Any]:
    """cloud-init's schema, less its top-level ``additionalProperties: false``: an unknown top-level key
    is a warning of cloudbake's own (with a suggestion), an error only under ``cloud_init.strict``."""
    with open(cloud_config_schema_path(), encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    schema.pop("additionalProperties", None)
    return schema


@functools.cache
def known_cloud_config_keys() -> tuple[str, ...]:
    """Every top-level key cloud-init's schema describes (its modules' properties), for did-you-mean."""
    schema = load_cloud_config_schema()
    keys: list[str] = []
    for part in schema.get("allOf", []):
        definition = schema["$defs"].get(part.get("$ref", "").rsplit("/", 1)[-1], {})
        keys += list(definition.get("properties", {}))
    return tuple(dict.fromkeys([*keys, *schema.get("properties", {}), *UNDESCRIBED_KEYS]))


def read_cloud_config(file: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Parse a ``#cloud-config`` file; other user-data forms are named and refused."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{file}: user-data file not found",
                            hint="set cloud_init.user_data in the pipeline to an existing file") from None
    except OSError as err:
        raise PipelineError(f"{file}: cannot read user-data: {err.strerror or err}") from None
    if data.startswith(b"\x1f\x8b"):
        raise PipelineError(f"{file}:1:1: user-data is gzip-compressed; cloudbake merges a plain #cloud-config file",
                            hint=f"decompress it (gunzip -c {file.name}); the seed ISO has room for it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise PipelineError(f"{file}:{line}:1: user-data is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                            f"{err.start})", hint="save the file as UTF-8") from None
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip()
    if first.startswith("#!"):
        raise PipelineError(f"{file}:1:1: user-data is a shell script ({first}); cloudbake needs #cloud-config "
                            "to add the user and the power-off",
                            hint="put the script's commands under runcmd: in a #cloud-config file")
    if first.lower().startswith(("content-type:", "mime-version:")):
        raise PipelineError(f"{file}:1:1: user-data is MIME multi-part; cloudbake merges only #cloud-config",
                            hint="use a single #cloud-config file (runcmd/write_files cover most scripts)")
    if first.startswith(("#include", "#cloud-boothook", "#part-handler", "#cloud-config-archive", "#upstart-job")):
        raise PipelineError(f"{file}:1:1: user-data format '{first}' is not supported by cloudbake",
                            hint="use a #cloud-config file")
    if first.rstrip() != CLOUD_CONFIG_HEADER:
        raise PipelineError(f"{file}:1:1: user-data must start with the line '#cloud-config' "
                            f"(found {first[:40]!r}); without it cloud-init ignores the whole file",
                            hint="add '#cloud-config' as the first line")
    document, root = parse_yaml(text, file)
    if document is None:
        return {}, root
    if not isinstance(document, dict):
        raise PipelineError(f"{file}:1:1: cloud-config must be a mapping of keys, not a {type(document).__name__}")
    return document, root


def cloud_config_problems(document: dict[str, Any], root: yaml.Node | None,
                          strict: bool) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) for a cloud-config document.

    What a current cloud-init runs is never an error: keys it marks deprecated are warnings naming the
    modern form, an empty ``ssh_authorized_keys`` is a placeholder (``key_placeholders``), and unknown
    top-level keys are warnings unless ``strict``.
    """
    schema = load_cloud_config_schema()
    checked = without_key_placeholders(document)
    errors = schema_problems(checked, root, schema)
    for problem in errors:
        if "is not one of" in problem.message and problem.message.startswith(("True ", "False ")):
            object.__setattr__(problem, "message", problem.message
                               + " (YAML reads unquoted on/off/yes/no as booleans: quote the value)")
    known = list(known_cloud_config_keys())
    unknown = []
    for key in document:
        if str(key) not in known:
            line, col = locate(root, [str(key)], key=True)
            unknown.append(Problem(line, col, str(key),
                                   f"unknown cloud-config key{suggest(str(key), known)}; cloud-init will ignore it"))
    deprecated = deprecation_problems(checked, root, schema)
    if strict:
        return sorted(errors + unknown, key=lambda p: (p.line, p.col)), deprecated
    return errors, sorted(unknown + deprecated, key=lambda p: (p.line, p.col))


def _deprecated_keyword(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if value is True:
        version = schema.get("deprecated_version")
        said = schema.get("deprecated_description") or "cloud-init will drop it"
        yield jsonschema.ValidationError(f"deprecated{f' since cloud-init {version}' if version else ''}: {said}")


_DeprecationValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft4Validator, {"deprecated": _deprecated_keyword})


def deprecation_problems(document: dict[str, Any], root: yaml.Node | None, schema: dict[str, Any]) -> list[Problem]:
    """Keys cloud-init still runs but has replaced, each with the replacement its schema names (warnings,
    as ``cloud-init schema`` reports them)."""
    problems = []
    for error in _deprecations(_DeprecationValidator(schema).iter_errors(document))[1]:
        path = list(error.absolute_path)
        line, col = locate(root, path, key=bool(path) and isinstance(path[-1], str))
        problems.append(Problem(line, col, dotted(path), error.message))
    return list({(p.line, p.col, p.message): p for p in problems}.values())


def _deprecations(errors: Iterator[Any]) -> tuple[bool, list[Any]]:
    """(every error is a deprecation, the deprecations). Of a oneOf/anyOf, the branch that is valid but for
    its deprecations counts, as cloud-init's own validator treats it; the other branches' do not."""
    only, found = True, []
    for error in errors:
        if error.validator == "deprecated":
            found.append(error)
            continue
        if error.validator in ("oneOf", "anyOf") and error.context:
            branches: dict[Any, list[Any]] = {}
            for sub in error.context:
                branches.setdefault(sub.relative_schema_path[0], []).append(sub)
            valid_but_deprecated = [subs for clean, subs in map(_deprecations, map(iter, branches.values())) if clean]
            if valid_but_deprecated:
                found += valid_but_deprecated[0]
                continue
        only = False
    return only, found


def key_placeholders(document: dict[str, Any]) -> list[str]:
    """The users whose ``ssh_authorized_keys`` is present but empty (``[]`` or nothing at all).

    Such an entry is a placeholder for keys added before the seed is built (the faas project's own
    script appends a fresh key there); cloud-init itself would fail on a null list. cloudbake reads
    the intent: these users get the keys its own user gets (the bake's, and each run's).
    """
    users = document.get("users")
    if not isinstance(users, list):
        return []
    return [str(entry.get("name")) for entry in users
            if isinstance(entry, dict) and "ssh_authorized_keys" in entry and not entry["ssh_authorized_keys"]]


def without_key_placeholders(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with every key placeholder left out, as the schema check should see it."""
    if not key_placeholders(document):
        return document
    users = [{k: v for k, v in entry.items() if not (k == "ssh_authorized_keys" and not v)}
             if isinstance(entry, dict) else entry for entry in document["users"]]
    return {**document, "users": users}


def placeholder_users(pipeline: Pipeline) -> list[str]:
    """The users of the pipeline's user-data, other than cloudbake's own, that get each run's key."""
    document, _ = read_cloud_config(pipeline.cloud_init.user_data)
    return [name for name in key_placeholders(document) if name != pipeline.cloud_init.user]


def check_power_state(document: dict[str, Any], root: yaml.Node | None) -> list[Problem]:
    """The bake needs the guest to power off by itself, and owns the power_state condition."""
    state = document.get("power_state")
    if not isinstance(state, dict):
        return []
    problems = []
    if state.get("mode", "poweroff") != "poweroff":
        line, col = locate(root, ["power_state", "mode"])
        problems.append(Problem(line, col, "power_state.mode",
                                f"{state.get('mode')!r} would keep the bake VM running or rebooting; "
                                "the bake needs 'poweroff' (or leave power_state out: cloudbake adds it)"))
    if "condition" in state:
        line, col = locate(root, ["power_state", "condition"])
        problems.append(Problem(line, col, "power_state.condition",
                                "cloudbake uses the condition to report cloud-init's result and generalize "
                                "the image; move this check to runcmd"))
    return problems


def check_with_host_cloud_init(user_data: bytes) -> None:
    """Where the host has cloud-init, let its own schema check have a say too."""
    if shutil.which("cloud-init") is None:
        return
    with tempfile.NamedTemporaryFile(prefix="user-data-", suffix=".yaml") as f:
        f.write(user_data)
        f.flush()
        result = run(["cloud-init", "schema", "-c", f.name], stage="seed", timeout=60, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise PipelineError(f"cloud-init's own schema check rejected the merged user-data:\n{output}",
                            hint="fix the keys it names in your user-data")


# --- SSH keys ----------------------------------------------------------------------


def is_public_key_text(entry: str) -> bool:
    return entry.strip().startswith(("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-"))


def key_file_matches(entry: str, base: Path) -> list[str]:
    """The files a ``cloud_init.ssh_authorized_keys`` path or glob names (relative to the pipeline's folder)."""
    pattern = str(base / os.path.expanduser(entry))
    return sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]


def seed_input_files(pipeline: Pipeline) -> list[Path]:
    """Every file the bake's seed of ``pipeline`` is made from: what a resolved build must be stamped with,
    so an edit to any of them (a new key matching a glob, a changed lock file) resolves afresh."""
    from cloudbake.image.cacerts import HOST_BUNDLE

    ci, base = pipeline.cloud_init, pipeline.file.parent
    files = [ci.user_data, *(f for f in (ci.network_config, ci.vendor_data) if f is not None)]
    files += [Path(match) for entry in ci.ssh_authorized_keys if not is_public_key_text(entry)
              for match in key_file_matches(entry, base)]
    files += [base / name for pattern in pipeline.test.dependencies.files
              for name in dependency_matches(base, pattern)]
    files += [HOST_BUNDLE] if isinstance(ci.ca_certs, str) else list(ci.ca_certs)
    return files


def resolve_authorized_keys(entries: tuple[str, ...], base: Path, *, warn: bool = True) -> list[str]:
    """Key text as given; ``.pub`` paths and globs read now. A glob matching nothing only warns."""
    keys: list[str] = []
    for entry in entries:
        if is_public_key_text(entry):
            keys.append(entry.strip())
            continue
        matches = key_file_matches(entry, base)
        if not matches and warn:
            _warn_once(f"no public key matches {entry} (cloud_init.ssh_authorized_keys); you can still log in "
                       "through test-image and console, which add a key of their own per run")
        for match in matches:
            try:
                text = Path(match).read_text(encoding="utf-8")
            except OSError as err:
                raise PipelineError(f"cloud_init.ssh_authorized_keys: cannot read {match}: {err.strerror or err}",
                                    hint="give the path of an existing .pub file, or the key text itself") from None
            except UnicodeDecodeError:
                raise PipelineError(f"cloud_init.ssh_authorized_keys: {match} is not UTF-8 text, so not an OpenSSH "
                                    "public key", hint="point to the .pub file, never the private key") from None
            for line in text.splitlines():
                if line.strip() and not line.startswith("#"):
                    if not is_public_key_text(line):
                        raise PipelineError(f"cloud_init.ssh_authorized_keys: {match} does not hold an "
                                            "OpenSSH public key", hint="point to the .pub file, never the private key")
                    keys.append(line.strip())
    return list(dict.fromkeys(keys))


# --- the merge ---------------------------------------------------------------------


def bake_finish_script(generalize: bool, relabel: bool = False) -> str:
    """Runs as power_state's condition: after cloud-init's final stage, right before power-off.

    It reports cloud-init's status and result on the console behind markers the bake
    parses, then generalizes the guest so every clone is a new machine. ``relabel`` (Fedora,
    whose SELinux enforces labels) restores the SELinux labels of what the bake wrote: files
    written by cloud-init's modules or the user's commands can carry the wrong context, which
    ``cloud-init clean`` does not mend and an enforcing clone would refuse (an unreadable
    authorized_keys, a service that cannot start).
    """
    # No `cloud-init status` here: the status and result files say the same, and every start of
    # cloud-init's Python costs seconds under TCG (docs/how-it-works.md, "Bake time").
    # CLOUDBAKE-STEP lines carry the guest's uptime, so the console shows what each step cost.
    step = 'echo "CLOUDBAKE-STEP {} $(cut -d" " -f1 /proc/uptime)"'.format
    lines = [
        "exec >/dev/console 2>&1",
        step("start"),
        f'echo "{STATUS_MARKER} {BOOT_NONCE_PLACEHOLDER} $(base64 -w0 /var/lib/cloud/data/status.json 2>/dev/null)"',
        f'echo "{RESULT_MARKER} {BOOT_NONCE_PLACEHOLDER} $(base64 -w0 /var/lib/cloud/data/result.json 2>/dev/null)"',
        # Which units cost the boot its time (systemd's own programs, no Python start).
        profile_script(BOOT_NONCE_PLACEHOLDER),
        # Only when the guest's cloud-init warned about the user-data's schema (its Python costs seconds
        # under TCG): its own annotated verdict and status, before `cloud-init clean` removes the logs.
        f"if grep -qE '{GUEST_SCHEMA_WARNING}' /var/log/cloud-init.log 2>/dev/null; then "
        f'echo "{SCHEMA_MARKER} {BOOT_NONCE_PLACEHOLDER} $( {{ cloud-init --version; '
        "cloud-init schema --system --annotate; cloud-init status --long; } 2>&1 | tail -c 16384 | base64 -w0)\"; fi",
    ]
    if generalize:
        lines += [
            # A fresh instance-id and machine-id on the next boot make cloud-init and systemd
            # treat each clone as a first boot; host keys are regenerated then.
            "cloud-init clean --logs --machine-id || { cloud-init clean --logs; : > /etc/machine-id; }",
            "rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub",
            f'echo "{GENERALIZED_MARKER} {BOOT_NONCE_PLACEHOLDER}"',
            step("generalized"),
        ]
    if relabel:
        lines += ["command -v restorecon >/dev/null && restorecon -R /etc /home /root /var /usr/local 2>/dev/null || :",
                  step("relabelled")]
    # Free blocks reach the host as discards, so the published image stays compact.
    lines += ["fstrim -a >/dev/null 2>&1 || true", step("trimmed"), "sync", step("synced"), "exit 0"]
    return "\n".join(lines) + "\n"


def merge_user_data(user: dict[str, Any], pipeline: Pipeline, keys: list[str], *,
                    for_bake: bool) -> dict[str, Any]:
    """The user's cloud-config plus the pipeline's user, keys and (for the bake) power-off."""
    merged = dict(user)
    name = pipeline.cloud_init.user
    users = user.get("users")
    users = [users] if isinstance(users, str) else list(users or ["default"])
    placeholders = key_placeholders(user)
    if placeholders:
        _warn_once(f"users {', '.join(placeholders)}: an empty ssh_authorized_keys is read as a placeholder; "
                   f"{'they get' if len(placeholders) > 1 else 'it gets'} the keys cloudbake gives {name} "
                   "(the bake's and each test run's)")
    for index, entry in enumerate(users):
        if isinstance(entry, dict) and entry.get("name") in placeholders and entry.get("name") != name:
            users[index] = {k: v for k, v in entry.items() if k != "ssh_authorized_keys"}
            if keys:
                users[index]["ssh_authorized_keys"] = keys
    for index, entry in enumerate(users):
        if isinstance(entry, dict) and entry.get("name") == name:
            existing = list(entry.get("ssh_authorized_keys") or [])
            users[index] = {k: v for k, v in entry.items() if k != "ssh_authorized_keys"}
            if existing or keys:
                users[index]["ssh_authorized_keys"] = list(dict.fromkeys(existing + keys))
            break
    else:
        added: dict[str, Any] = {
            "name": name,
            "sudo": SUDO_NOPASSWD,
            "shell": "/bin/bash",
            "lock_passwd": True,
        }
        if keys:
            added["ssh_authorized_keys"] = keys
        users.append(added)
    merged["users"] = users
    if for_bake and pipeline.cloud_init.generalize and "ssh_genkeytypes" not in user:
        # Host keys made during the bake are deleted when it generalizes: not making them saves
        # the key generation (5-8 s under TCG). Every clone makes its own at its first boot.
        merged["ssh_genkeytypes"] = []
    certificates = certificates_for(pipeline) if for_bake else []
    if certificates:
        wanted = dict(user.get("ca_certs") or {})
        merged["ca_certs"] = {**wanted, "trusted": [*(wanted.get("trusted") or []), *certificates]}
    if for_bake and pipeline.test.dependencies:
        merged.update(dependency_steps(user, pipeline))
    if for_bake:
        state = dict(user.get("power_state") or {})
        merged["power_state"] = {
            "mode": "poweroff",
            "delay": state.get("delay", "now"),
            "message": state.get("message", "cloudbake: cloud-init finished, powering off"),
            "timeout": state.get("timeout", 120),
            "condition": ["sh", "-c", bake_finish_script(pipeline.cloud_init.generalize,
                                                         relabel=facts(pipeline.source.distro).selinux)],
        }
    return merged


# --- the project's dependencies, baked by their content -------------------------------

# Where the bake's seed stages dependency files before they are copied into test.workdir as the run user.
DEPENDENCY_STAGING = "/var/lib/cloudbake/dependencies"
DEPENDENCY_FILES_MAX_BYTES = 8 << 20


def dependency_matches(base: Path, pattern: str) -> list[str]:
    """What one ``test.dependencies.files`` pattern names, relative to the pipeline's folder ``base``."""
    return sorted(glob.glob(pattern, root_dir=base, recursive=True))


def dependency_files(pipeline: Pipeline) -> list[tuple[str, bytes]]:
    """``test.dependencies.files`` as (path relative to the pipeline's folder, bytes), sorted: regular
    files inside that folder only (a link out of it is refused), each pattern matching at least one."""
    base = pipeline.file.parent
    found: dict[str, bytes] = {}
    total = 0
    for pattern in pipeline.test.dependencies.files:
        files = [name for name in dependency_matches(base, pattern) if (base / name).is_file()]
        if not files:
            raise PipelineError(f"test.dependencies.files: {pattern!r} matches no file in {base}",
                                hint="name files of your repository relative to the pipeline's folder")
        for name in files:
            real = (base / name).resolve()
            if not real.is_relative_to(base.resolve()):
                raise PipelineError(f"test.dependencies.files: {name} leads out of {base} (a link)",
                                    hint="list the file itself, inside the pipeline's folder")
            relative = real.relative_to(base.resolve()).as_posix()
            if relative not in found:
                found[relative] = real.read_bytes()
                total += len(found[relative])
    if total > DEPENDENCY_FILES_MAX_BYTES:
        raise PipelineError(f"test.dependencies.files: {total} bytes together, more than the seed carries "
                            f"({DEPENDENCY_FILES_MAX_BYTES >> 20} MiB)",
                            hint="list the lock and manifest files only (the code is uploaded at test time)")
    return sorted(found.items())


def dependency_steps(user: dict[str, Any], pipeline: Pipeline) -> dict[str, Any]:
    """The bake's ``write_files`` and ``runcmd`` for ``test.dependencies``: the files staged by cloud-init
    (deferred to its final stage, after users exist), then, after the user's own runcmd, copied into
    test.workdir and ``install`` run there as the run user. Their bytes are in the seed, so the image's
    key covers them."""
    deps, name = pipeline.test.dependencies, pipeline.cloud_init.user
    staged = [{"path": f"{DEPENDENCY_STAGING}/{relative}", "encoding": "b64",
               "content": base64.b64encode(data).decode(), "permissions": "0644", "defer": True}
              for relative, data in dependency_files(pipeline)]
    workdir = guest_path(pipeline.test.workdir)
    as_user = f"mkdir -p {workdir} && cd {workdir}"
    if staged:
        as_user += f" && cp -R {DEPENDENCY_STAGING}/. ."
    if deps.install:
        as_user += f" && {{ {deps.install}\n}}"
    step = f"su -l {shlex.quote(name)} -c {shlex.quote(as_user)} && rm -rf {DEPENDENCY_STAGING}"
    steps: dict[str, Any] = {"runcmd": [*(user.get("runcmd") or []), ["sh", "-c", step]]}
    if staged:
        steps["write_files"] = [*(user.get("write_files") or []), *staged]
    return steps


def with_boot_nonce(files: SeedFiles, nonce: str) -> SeedFiles:
    """The seed for one boot: its markers carry ``nonce`` (hex), the rest is byte for byte the same."""
    if not nonce.isalnum():
        raise ValueError("a boot nonce is alphanumeric")
    user_data = files.user_data.replace(BOOT_NONCE_PLACEHOLDER.encode(), nonce.encode())
    return dataclasses.replace(files, user_data=user_data)


def render_cloud_config(document: dict[str, Any]) -> bytes:
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)
    return f"{CLOUD_CONFIG_HEADER}\n{body}".encode()


def instance_id_for(*parts: bytes) -> str:
    """Derived from the seed's content: a changed config is a new instance to cloud-init."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return "cloudbake-" + digest.hexdigest()[:16]


def render_meta_data(instance_id: str, hostname: str) -> bytes:
    return yaml.safe_dump({"instance-id": instance_id, "local-hostname": hostname}, sort_keys=False).encode()


def read_network_config(file: Path) -> bytes:
    data = file.read_bytes()
    document, _ = parse_yaml(data.decode("utf-8", errors="replace"), file)
    if isinstance(document, dict) and isinstance(document.get("network"), dict):
        document = document["network"]
    if not isinstance(document, dict) or document.get("version") not in (1, 2):
        raise PipelineError(f"{file}:1:1: network-config needs 'version: 1' or 'version: 2' at the top",
                            hint="see cloud-init's network config v1/v2 documentation")
    return data


def build_seed_files(pipeline: Pipeline, *, for_bake: bool = True, extra: dict[str, Any] | None = None,
                     instance_id: str | None = None) -> SeedFiles:
    """Validate the pipeline's cloud-init inputs and produce the seed's files.

    ``extra`` is merged last at the top level (test-image adds per-run keys);
    ``instance_id`` overrides the content-derived one (test-image wants a fresh one).
    Every problem in the user-data is reported at once, before anything is written.
    """
    ci = pipeline.cloud_init
    document, root = read_cloud_config(ci.user_data)
    errors, warnings = cloud_config_problems(document, root, ci.strict)
    if for_bake:
        errors = sorted(errors + check_power_state(document, root), key=lambda p: (p.line, p.col))
    for warning in warnings:
        _warn_once(warning.render(ci.user_data))
    if errors:
        lines = "\n".join(p.render(ci.user_data) for p in errors)
        hint = "fix the keys named above"
        if ci.strict and warnings == [] and any("unknown cloud-config key" in p.message for p in errors):
            hint += " (cloud_init.strict is on: unknown keys are errors)"
        raise PipelineError(f"{ci.user_data}: {len(errors)} problem{'s' if len(errors) > 1 else ''} "
                            f"in user-data:\n{lines}", hint=hint)
    keys = resolve_authorized_keys(ci.ssh_authorized_keys, pipeline.file.parent)
    merged = merge_user_data(document, pipeline, keys, for_bake=for_bake)
    if extra:
        merged.update(extra)
    user_data = render_cloud_config(merged)
    check_with_host_cloud_init(user_data)
    network = read_network_config(ci.network_config) if ci.network_config else None
    vendor = ci.vendor_data.read_bytes() if ci.vendor_data else None
    iid = instance_id or instance_id_for(user_data, network or b"", vendor or b"", ci.hostname.encode())
    return SeedFiles(user_data, render_meta_data(iid, ci.hostname), network, vendor)


# --- the ISO -----------------------------------------------------------------------


class _FrozenClock:
    """Stands in for the ``time`` module inside pycdlib while a seed is written.

    pycdlib stamps dates from time.time() and time.localtime() when the ISO is
    created, when files are added and again when it is written. A fixed instant in
    UTC makes the bytes independent of when and in which time zone they were made.
    Only pycdlib's own module namespaces see it; the global time module is untouched.
    """

    def __init__(self, epoch: float) -> None:
        self._epoch = epoch

    def time(self) -> float:
        return self._epoch

    def localtime(self, secs: float | None = None) -> struct_time:
        return time.gmtime(self._epoch if secs is None else secs)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


_PYCDLIB_MODULES_WITH_TIME = ("pycdlib.pycdlib", "pycdlib.headervd", "pycdlib.dates", "pycdlib.utils")
_clock_lock = threading.Lock()


@contextmanager
def _pycdlib_clock(epoch: float) -> Iterator[None]:
    import importlib

    modules = [importlib.import_module(name) for name in _PYCDLIB_MODULES_WITH_TIME]
    # The lock keeps two seed builds in one process from restoring each other's clock.
    with _clock_lock:
        saved = [vars(module)["time"] for module in modules]
        clock = _FrozenClock(epoch)
        try:
            for module in modules:
                vars(module)["time"] = clock
            yield
        finally:
            for module, original in zip(modules, saved, strict=True):
                vars(module)["time"] = original


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_SOURCE_DATE_EPOCH
    try:
        return int(value)
    except ValueError:
        raise PipelineError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
                            hint="unset it or set it to an integer such as $(git log -1 --format=%ct)") from None


def iso_name(name: str) -> str:
    """ISO9660 level-3 name for a seed file: no hyphens allowed there, Rock Ridge/Joliet carry the real name."""
    return "/" + name.replace("-", "").upper()[:8] + ".;1"


def seed_iso_bytes(files: SeedFiles) -> bytes:
    """The ISO image: volume label ``cidata``, files in the root, Rock Ridge and Joliet names."""
    out = io.BytesIO()
    with _pycdlib_clock(source_date_epoch()):
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
        for name, data in files.items():
            iso.add_fp(io.BytesIO(data), len(data), iso_path=iso_name(name), rr_name=name, joliet_path="/" + name)
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def build_seed_iso(files: SeedFiles, dest: Path) -> str:
    """Write the seed ISO atomically; returns its SHA-256."""
    data = seed_iso_bytes(files)
    write_atomically(dest, data)
    return hashlib.sha256(data).hexdigest()


def run_seed(pipeline: Pipeline, paths: Paths) -> None:
    files = build_seed_files(pipeline, for_bake=True)
    digest = build_seed_iso(files, paths.seed_iso)
    log.info("wrote %s (sha256 %s…, %s)", paths.seed_iso, digest[:12],
             ", ".join(name for name, _ in files.items()))
