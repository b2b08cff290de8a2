"""Load ``pipeline.yaml``: validate it against the schema, locate every problem, freeze it.

The schema (``schema/pipeline.schema.json``) is the single source of truth for
keys, types, enums and defaults; this module only adds what JSON Schema cannot
say: where in the YAML file a problem is, and what the user probably meant.
"""

from __future__ import annotations

import difflib
import enum
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tasks.errors import PipelineError
from tasks.units import DiskSize, parse_disk_size, parse_duration, parse_size

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = PROJECT_ROOT / "schema" / "pipeline.schema.json"


class Arch(enum.StrEnum):
    amd64 = "amd64"
    arm64 = "arm64"


class Accel(enum.StrEnum):
    auto = "auto"
    kvm = "kvm"
    hvf = "hvf"
    tcg = "tcg"


class Firmware(enum.StrEnum):
    auto = "auto"
    bios = "bios"
    uefi = "uefi"


class Compression(enum.StrEnum):
    none = "none"
    zlib = "zlib"
    zstd = "zstd"


class SignaturePolicy(enum.StrEnum):
    required = "required"
    off = "off"


@dataclass(frozen=True)
class Verify:
    signature: SignaturePolicy
    keyring: Path | None
    fingerprints: tuple[str, ...]
    sha256: str | None


@dataclass(frozen=True)
class Source:
    release: str
    arch: Arch
    mirror: str
    channel: str
    verify: Verify


@dataclass(frozen=True)
class Disk:
    size: DiskSize
    compression: Compression


@dataclass(frozen=True)
class VM:
    cpus: int
    memory_bytes: int
    accel: Accel
    firmware: Firmware
    timeout_s: float
    qemu_args: tuple[str, ...]


@dataclass(frozen=True)
class CloudInit:
    user_data: Path
    network_config: Path | None
    vendor_data: Path | None
    hostname: str
    user: str
    ssh_authorized_keys: tuple[str, ...]
    strict: bool
    generalize: bool


@dataclass(frozen=True)
class TestSettings:
    command: str
    timeout_s: float
    artifacts: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline; every path is absolute."""

    file: Path
    name: str
    source: Source
    disk: Disk
    vm: VM
    cloud_init: CloudInit
    test: TestSettings
    output_dir: Path
    output_keep: int
    build_dir: Path
    cache_dir: Path
    raw: dict[str, Any]  # the validated document with defaults, for hashing and manifests


@functools.cache
def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("cloudbake-size", raises=ValueError)
    def _size(value: object) -> bool:
        return not isinstance(value, str) or parse_size(value) > 0

    @checker.checks("cloudbake-disk-size", raises=ValueError)
    def _disk(value: object) -> bool:
        return not isinstance(value, str) or bool(parse_disk_size(value))

    @checker.checks("cloudbake-duration", raises=ValueError)
    def _duration(value: object) -> bool:
        return not isinstance(value, str) or parse_duration(value) > 0

    @checker.checks("cloudbake-mirror-url", raises=ValueError)
    def _mirror(value: object) -> bool:
        if isinstance(value, str) and not value.startswith(("http://", "https://", "file://")):
            raise ValueError(f"{value!r} is not a mirror URL (http://, https:// or file://)")
        return True

    return checker


# --- locating problems in the YAML -------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int
    col: int
    path: str
    message: str

    def render(self, file: Path | str) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{file}:{self.line}:{self.col}: {where}{self.message}"


def _key_node(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if key_node.value == key:
            return key_node, value_node
    return None


def locate(root: yaml.Node | None, path: list[str | int], *, key: bool = False) -> tuple[int, int]:
    """1-based line and column of the node at ``path`` (or of its key), else of its nearest ancestor."""
    node = root
    if node is None:
        return 1, 1
    mark = node.start_mark
    for index, part in enumerate(path):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            found = _key_node(node, part)
            if found is None:
                break
            key_node, node = found
            last = index == len(path) - 1
            mark = key_node.start_mark if (key and last) else node.start_mark
            if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not last:
                mark = key_node.start_mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def dotted(path: Iterator[str | int] | list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def suggest(word: str, choices: list[str]) -> str:
    """' (did you mean 'memory'?)' or ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _duplicate_keys(node: yaml.Node | None, path: list[str | int]) -> Iterator[Problem]:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                mark = key_node.start_mark
                yield Problem(mark.line + 1, mark.column + 1, dotted([*path, key]),
                              "duplicate key: only one value would be used; remove one of them")
            seen.add(key)
            yield from _duplicate_keys(value_node, [*path, key])
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, [*path, index])


def schema_problems(document: Any, root: yaml.Node | None, schema: dict[str, Any]) -> list[Problem]:
    """Every schema violation in ``document``, located in the YAML and sorted by position."""
    validator = jsonschema.Draft202012Validator(schema, format_checker=_format_checker())
    problems: list[Problem] = list(_duplicate_keys(root, []))
    for error in validator.iter_errors(document):
        if error.context:  # oneOf/anyOf: report the branch that came closest, not "valid under none"
            error = jsonschema.exceptions.best_match([error])
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = list(error.schema.get("properties", {}))
            for extra in sorted(set(error.instance) - set(allowed)):
                line, col = locate(root, [*path, str(extra)], key=True)
                message = f"unknown key{suggest(str(extra), allowed)}; allowed here: {', '.join(allowed)}"
                problems.append(Problem(line, col, dotted([*path, str(extra)]), message))
            continue
        line, col = locate(root, path)
        if error.validator == "enum":
            message = f"{error.instance!r} is not one of: {', '.join(map(str, error.validator_value))}"
            message += suggest(str(error.instance), [str(v) for v in error.validator_value])
        elif error.validator == "pattern":
            description = _schema_at(schema, path).get("description", "")
            message = f"{error.instance!r} is not valid here" + (f": {description}" if description else "")
        elif error.validator == "format" and error.cause is not None:
            message = str(error.cause)
        else:
            message = error.message
        problems.append(Problem(line, col, dotted(path), message))
    return sorted(problems, key=lambda p: (p.line, p.col, p.path))


def _schema_at(schema: dict[str, Any], path: list[str | int]) -> dict[str, Any]:
    node = schema
    for part in path:
        node = node.get("items", {}) if isinstance(part, int) else node.get("properties", {}).get(part, {})
    return node


def fill_defaults(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with every missing property set to its schema default."""
    filled = dict(document)
    for key, sub in schema.get("properties", {}).items():
        if key not in filled and "default" in sub:
            filled[key] = json.loads(json.dumps(sub["default"]))
        if isinstance(filled.get(key), dict) and "properties" in sub:
            filled[key] = fill_defaults(filled[key], sub)
    return filled


# --- loading ------------------------------------------------------------------------


def parse_yaml(text: str, file: Path) -> tuple[Any, yaml.Node | None]:
    """The document and its node tree; a syntax error names FILE:LINE:COL."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PipelineError(f"{file}:{line}:{col}: YAML syntax error: {err.problem or err}",
                            hint="fix the YAML syntax (indentation, quotes, colons) at that line") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{file}: YAML error: {err}") from None
    return document, root


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    return (base / os.path.expanduser(value)).resolve()


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cloudbake"


def load_pipeline(file: Path | str) -> Pipeline:
    """Read, validate and freeze a pipeline file. All problems are reported in one PipelineError."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{file}: pipeline file not found",
                            hint="create it (start from cloudbake's pipeline.yaml) or pass pipeline=PATH") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{file}: cannot read pipeline file: {err}") from None
    document, root = parse_yaml(text, file)
    if document is None:
        raise PipelineError(f"{file}:1:1: the pipeline is empty",
                            hint="start from the pipeline.yaml shipped with cloudbake; every key has a default")
    if not isinstance(document, dict):
        line, col = locate(root, [])
        raise PipelineError(f"{file}:{line}:{col}: the pipeline must be a mapping of keys (name:, source:, ...), "
                            f"not a {type(document).__name__}")
    schema = load_schema()
    problems = schema_problems(document, root, schema)
    base = file.resolve().parent
    if not problems:
        problems = _file_problems(document, root, base)
    if problems:
        lines = "\n".join(p.render(file) for p in problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise PipelineError(f"{file}: {count}:\n{lines}",
                            hint="every key is described in docs/configuration.md")
    return freeze(fill_defaults(document, schema), file)


def _file_problems(document: dict[str, Any], root: yaml.Node | None, base: Path) -> list[Problem]:
    """Files the pipeline names must exist when it loads, not halfway through a bake."""
    filled = fill_defaults(document, load_schema())
    checks: list[tuple[list[str | int], str | None]] = [
        (["cloud_init", "user_data"], filled["cloud_init"]["user_data"]),
        (["cloud_init", "network_config"], filled["cloud_init"]["network_config"]),
        (["cloud_init", "vendor_data"], filled["cloud_init"]["vendor_data"]),
        (["source", "verify", "keyring"], filled["source"]["verify"]["keyring"]),
    ]
    problems = []
    for path, value in checks:
        resolved = _resolve(base, value)
        if resolved is not None and not resolved.is_file():
            line, col = locate(root, path)
            problems.append(Problem(line, col, dotted(path),
                                    f"file not found: {resolved} (paths are relative to the pipeline's folder)"))
    return problems


def freeze(doc: dict[str, Any], file: Path) -> Pipeline:
    base = file.resolve().parent
    src, ver, disk, vm, ci, test = (doc["source"], doc["source"]["verify"], doc["disk"], doc["vm"],
                                    doc["cloud_init"], doc["test"])
    user_data = _resolve(base, ci["user_data"])
    assert user_data is not None
    cache_dir = _resolve(base, doc["cache"]["dir"]) or default_cache_dir()
    output_dir = _resolve(base, doc["output"]["dir"])
    build_dir = _resolve(base, doc["build"]["dir"])
    assert output_dir is not None and build_dir is not None
    return Pipeline(
        file=file.resolve(),
        name=doc["name"],
        source=Source(
            release=src["release"],
            arch=Arch(src["arch"]),
            mirror=src["mirror"] if src["mirror"].endswith("/") else src["mirror"] + "/",
            channel=src["channel"],
            verify=Verify(
                signature=SignaturePolicy(ver["signature"]),
                keyring=_resolve(base, ver["keyring"]),
                fingerprints=tuple(fp.upper() for fp in ver["fingerprints"]),
                sha256=ver["sha256"].lower() if ver["sha256"] else None,
            ),
        ),
        disk=Disk(size=parse_disk_size(disk["size"]), compression=Compression(disk["compression"])),
        vm=VM(
            cpus=vm["cpus"],
            memory_bytes=parse_size(vm["memory"]),
            accel=Accel(vm["accel"]),
            firmware=Firmware(vm["firmware"]),
            timeout_s=parse_duration(vm["timeout"]),
            qemu_args=tuple(vm["qemu_args"]),
        ),
        cloud_init=CloudInit(
            user_data=user_data,
            network_config=_resolve(base, ci["network_config"]),
            vendor_data=_resolve(base, ci["vendor_data"]),
            hostname=ci["hostname"],
            user=ci["user"],
            ssh_authorized_keys=tuple(ci["ssh_authorized_keys"]),
            strict=ci["strict"],
            generalize=ci["generalize"],
        ),
        test=TestSettings(
            command=test["command"],
            timeout_s=parse_duration(test["timeout"]),
            artifacts=tuple(test["artifacts"]),
        ),
        output_dir=output_dir,
        output_keep=doc["output"]["keep"],
        build_dir=build_dir,
        cache_dir=cache_dir,
        raw=doc,
    )
