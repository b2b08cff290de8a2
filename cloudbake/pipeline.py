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
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cloudbake.errors import PipelineError
from cloudbake.schemas import pipeline_schema_path
from cloudbake.units import DiskSize, parse_disk_size, parse_duration, parse_size


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
    flatten: bool      # a layered image: self-contained (True) or backed by its parent's image


@dataclass(frozen=True)
class VM:
    cpus: int
    memory_bytes: int
    accel: Accel
    firmware: Firmware
    timeout_s: float
    qemu_args: tuple[str, ...]        # every boot; not in the key
    bake_qemu_args: tuple[str, ...]   # the bake's boot only; in the key


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
class Forward:
    """A guest TCP port reachable on 127.0.0.1 of the host; ``host`` 0 means any free port."""

    host: int
    guest: int


@dataclass(frozen=True)
class TestSettings:
    command: str
    upload: str | tuple[str, ...] | None    # "git", patterns, or None for nothing
    workdir: str
    env: tuple[tuple[str, str], ...]
    forward: tuple[Forward, ...]
    warm: bool
    timeout_s: float
    artifacts: tuple[str, ...]
    artifacts_max_bytes: int
    parallel: int
    shards: int | None


@dataclass(frozen=True)
class RemoteCache:
    """``cache.remote``: an OCI registry repository holding baked images tagged with their key."""

    registry: str           # host[:port], as the registry's API and credential stores name it
    repository: str         # path inside the registry, e.g. "acme/images"
    push: bool
    tag_latest: bool
    plain_http: bool
    ca_file: Path | None

    @property
    def url(self) -> str:
        return f"oci://{self.registry}/{self.repository}"


def parse_remote(url: str) -> tuple[str, str]:
    """``oci://host[:port]/repo/sitory`` (as the schema admits it) -> (registry, repository)."""
    registry, _, repository = url.removeprefix("oci://").partition("/")
    return registry.lower(), repository


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
    remote: RemoteCache | None
    raw: dict[str, Any]  # the validated document with defaults, for hashing and manifests
    # The image this one is built on (``from:``), baked first; None: built on the upstream image.
    parent: Pipeline | None = None
    # The top-level name: shared by every image of the file (one doit state per file).
    family: str = ""
    # The lock pinning the upstream image; a layered image shares its root ancestor's.
    lock_file: Path = Path()

    @property
    def is_layer(self) -> bool:
        """Published as a qcow2 backed by its parent's image (``from:`` with disk.flatten: false): not
        self-contained, so the registry cache does not hold it."""
        return self.parent is not None and not self.disk.flatten

    @property
    def root(self) -> Pipeline:
        """The ancestor built on the upstream image (self when not layered): its source and lock count."""
        return self.parent.root if self.parent is not None else self


# Ubuntu releases whose cloud images cloudbake knows how to find, version -> codename.
RELEASES = {
    "18.04": "bionic", "20.04": "focal", "22.04": "jammy", "23.10": "mantic", "24.04": "noble",
    "24.10": "oracular", "25.04": "plucky", "25.10": "questing", "26.04": "resolute",
}


@functools.cache
def load_schema() -> dict[str, Any]:
    with open(pipeline_schema_path(), encoding="utf-8") as f:
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


def _is_strict_integer(checker: Any, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# JSON Schema counts 2.0 as an integer; QEMU's -smp does not. Integers are written as integers.
_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)


def _closest_branch_error(error: Any) -> Any:
    """The most telling failure inside a oneOf/anyOf: from a branch whose type matched, the deepest.

    "is not valid under any of the given schemas" names no key; the branch that took the
    value's type (an object for a user entry) failed for a reason worth showing, such as
    an unknown key, and that is usually the deepest failure.
    """
    leaves: list[Any] = []
    pending = list(error.context or [])
    while pending:
        current = pending.pop()
        if current.context:
            pending.extend(current.context)
        else:
            leaves.append(current)
    telling = [leaf for leaf in leaves if leaf.validator != "type"] or leaves
    if not telling:
        return error
    return max(telling, key=lambda leaf: (len(leaf.absolute_path), leaf.validator == "additionalProperties"))


def schema_problems(document: Any, root: yaml.Node | None, schema: dict[str, Any]) -> list[Problem]:
    """Every schema violation in ``document``, located in the YAML and sorted by position."""
    # cloudbake's own schemas are 2020-12; cloud-init's is draft-04 and is read as cloud-init reads it.
    own = schema.get("$schema", "").endswith("2020-12/schema")
    validator_class: Any = _Validator if own else jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=_format_checker())
    error: Any
    problems: list[Problem] = list(_duplicate_keys(root, []))
    for error in validator.iter_errors(document):
        if error.context:  # oneOf/anyOf: report the branch that came closest, not "valid under none"
            error = _closest_branch_error(error)
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


# A config file nests a handful of levels; thousands only come from hostile input, and
# PyYAML's composer recurses once per level.
MAX_YAML_DEPTH = 64
# Aliases let a few lines stand for billions of nodes ("billion laughs"); a real config has
# a few hundred. Counted on the node graph before anything is expanded.
MAX_YAML_NODES = 100_000
_NESTING_OPENERS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
                    yaml.FlowSequenceStartToken)
_NESTING_CLOSERS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


class _Yaml12BooleansLoader(yaml.SafeLoader):
    """SafeLoader that reads only true/false as booleans (YAML 1.2), so `signature: off` is the word 'off'."""


_Yaml12BooleansLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BooleansLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _check_depth(text: str, file: Path) -> None:
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):  # the scanner is iterative: safe at any depth
        if isinstance(token, _NESTING_OPENERS):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                mark = token.start_mark
                raise PipelineError(f"{file}:{mark.line + 1}:{mark.column + 1}: nested more than "
                                    f"{MAX_YAML_DEPTH} levels deep", hint="a configuration never needs this much "
                                                                          "nesting; check the file")
        elif isinstance(token, _NESTING_CLOSERS):
            depth -= 1


def _check_expansion(root: yaml.Node, file: Path) -> None:
    """Refuse documents whose aliases expand past MAX_YAML_NODES nodes, or refer to themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            mark = node.start_mark
            raise PipelineError(f"{file}:{mark.line + 1}:{mark.column + 1}: an alias refers to the node that "
                                "contains it (a recursive structure)", hint="remove the recursive alias")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_YAML_NODES:
            mark = node.start_mark
            raise PipelineError(f"{file}:{mark.line + 1}:{mark.column + 1}: YAML aliases here expand to more than "
                                f"{MAX_YAML_NODES:,} values; refused before expanding them",
                                hint="write the values out, or use fewer nested aliases")
        return total

    size(root)


def parse_yaml(text: str, file: Path, *, yaml12_booleans: bool = False) -> tuple[Any, yaml.Node | None]:
    """The document and its node tree, parsed once; a syntax error names FILE:LINE:COL.

    Hostile documents (too deep, alias bombs, recursive aliases) are refused with their
    position before anything is expanded. ``yaml12_booleans`` reads only true/false as
    booleans, for cloudbake's own files; user-data keeps YAML 1.1, as cloud-init reads it.
    """
    loader_class = _Yaml12BooleansLoader if yaml12_booleans else yaml.SafeLoader
    try:
        _check_depth(text, file)
        loader = loader_class(text)
        try:
            root = loader.get_single_node()
            document = None
            if root is not None:
                _check_expansion(root, file)
                document = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PipelineError(f"{file}:{line}:{col}: YAML syntax error: {err.problem or err}",
                            hint="fix the YAML syntax (indentation, quotes, colons) at that line") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{file}: YAML error: {err}") from None
    except (RecursionError, ValueError, OverflowError) as err:
        raise PipelineError(f"{file}: cannot read this YAML: {err}") from None
    return document, root


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    try:
        return (base / os.path.expanduser(value)).resolve()
    except RuntimeError as err:  # Python < 3.13 raises RuntimeError for symlink loops
        raise OSError(str(err)) from None


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cloudbake"


def _read_document(file: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{file}: pipeline file not found",
                            hint="create it (start from cloudbake's pipeline.yaml) or pass pipeline=PATH") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{file}: cannot read pipeline file: {err}") from None
    document, root = parse_yaml(text, file, yaml12_booleans=True)
    if document is None:
        raise PipelineError(f"{file}:1:1: the pipeline is empty",
                            hint="start from the pipeline.yaml shipped with cloudbake; every key has a default")
    if not isinstance(document, dict):
        line, col = locate(root, [])
        raise PipelineError(f"{file}:{line}:{col}: the pipeline must be a mapping of keys (name:, source:, ...), "
                            f"not a {type(document).__name__}")
    return document, root


def _raise_problems(file: Path, problems: list[Problem]) -> None:
    if problems:
        rendered = list(dict.fromkeys(p.render(file) for p in problems))  # an override shared by images: once
        count = f"{len(rendered)} problem{'s' if len(rendered) > 1 else ''}"
        raise PipelineError(f"{file}: {count}:\n" + "\n".join(rendered),
                            hint="every key is described in docs/configuration.md")


def load_images(file: Path | str) -> tuple[Pipeline, ...]:
    """Read, validate and freeze every image a pipeline file describes, parents before children.

    A file without ``matrix:`` or ``images:`` describes one image. All problems are reported
    in one PipelineError, each with its file, line and column (an override's own line).
    """
    file = Path(file)
    document, root = _read_document(file)
    schema = load_schema()
    problems = schema_problems(document, root, schema)
    _raise_problems(file, problems)
    plans, problems = plan_images(document, root)
    base = file.resolve().parent
    docs: dict[str, dict[str, Any]] = {}
    for plan in plans:
        where = plan.locator(root)
        merged = plan.document
        found = [replace_position(p, where(_parse_dotted(p.path))) for p in schema_problems(merged, None, schema)]
        docs[plan.name] = fill_defaults(merged, schema)
        if not found:
            found = _file_problems(docs[plan.name], where, base)
        if not found and plan.parent in docs:
            found = _parent_problems(plan, docs[plan.name], docs[plan.parent], where)
        problems += [Problem(p.line, p.col, p.path, f"{p.message} (image {plan.name})" if len(plans) > 1
                             else p.message) for p in found]
    _raise_problems(file, problems)
    family = str(fill_defaults(document, schema)["name"])
    frozen: dict[str, Pipeline] = {}
    for plan in plans:
        parent = frozen[plan.parent] if plan.parent is not None else None
        if parent is not None:
            lock_file = parent.lock_file
        elif len(plans) == 1:
            lock_file = file.resolve().with_suffix(".lock")
        else:
            lock_file = file.resolve().with_name(f"{file.stem}.{plan.name}.lock")
        frozen[plan.name] = freeze(docs[plan.name], file, parent=parent, family=family, lock_file=lock_file)
    return tuple(frozen.values())


def load_pipeline(file: Path | str, image: str | None = None) -> Pipeline:
    """The one image of a pipeline file, or the one named ``image`` in a file that describes several."""
    return select_image(load_images(file), image, file)


def select_image(images: tuple[Pipeline, ...], image: str | None, file: Path | str) -> Pipeline:
    names = [pipeline.name for pipeline in images]
    if image is None:
        if len(images) == 1:
            return images[0]
        raise PipelineError(f"{file} describes {len(images)} images ({', '.join(names)}); name one",
                            hint="pass --image NAME (cloudbake), or use the task of one image: "
                                 f"doit bake:{names[0]}")
    for pipeline in images:
        if pipeline.name == image:
            return pipeline
    raise PipelineError(f"{file} has no image named {image!r}{suggest(image, names)}; its images: {', '.join(names)}")


# --- many images: matrix and images -----------------------------------------------------


# Matrix shorthands: the keys a matrix nearly always spans.
MATRIX_SHORTHANDS = {"release": "source.release", "arch": "source.arch"}
# More images than this in one file is a mistake (or hostile), not a test matrix.
MAX_IMAGES = 256
# Keys an image may not set for itself: the file's name and layout, shared by all its images.
SHARED_ONLY = ("name", "matrix", "images", "output", "build", "cache")


# Line and column in the file of a path in an image's merged document.
Locator = Callable[[list[str | int]], tuple[int, int]]


@dataclass(frozen=True)
class ImagePlan:
    """One image of a file before validation: its document and where each of its values was written."""

    name: str
    parent: str | None
    document: dict[str, Any]
    entry_index: int | None                      # images[i] whose overrides it carries
    entry: dict[str, Any]                        # those overrides (without name and from)
    cell: tuple[tuple[str, str, int], ...]       # matrix (key as written, dotted path, value index)

    def locator(self, root: yaml.Node | None) -> Locator:
        """FILE positions for paths of the merged document: an override's line, a matrix value's, else the shared."""
        def where(path: list[str | int]) -> tuple[int, int]:
            if self.entry_index is not None and _has_path(self.entry, path):
                return locate(root, ["images", self.entry_index, *path])
            for written, dotted_path, index in self.cell:
                parts = dotted_path.split(".")
                if path[:len(parts)] == parts:
                    return locate(root, ["matrix", written, index])
            return locate(root, path)
        return where


def _has_path(document: Any, path: list[str | int]) -> bool:
    """Whether ``document`` (an image's overrides) sets the value at ``path``, or a mapping above it."""
    if not path or not isinstance(document, dict) or path[0] not in document:
        return False
    return len(path) == 1 or _has_path(document[path[0]], path[1:])


def _parse_dotted(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(index) if index else name)
    return parts


def replace_position(problem: Problem, position: tuple[int, int]) -> Problem:
    return Problem(position[0], position[1], problem.path, problem.message)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on ``base``: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(document: dict[str, Any], dotted_path: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted_path.partition(".")
    found = document.get(head)
    inner: dict[str, Any] = found if isinstance(found, dict) else {}
    return {**document, head: _set_dotted(inner, rest, value) if rest else value}


def _schema_has(dotted_path: str) -> bool:
    node: dict[str, Any] = load_schema()
    for part in dotted_path.split("."):
        found = node.get("properties", {}).get(part)
        if found is None:
            return False
        node = found
    return True


def _matrix_cells(matrix: dict[str, list[Any]], root: yaml.Node | None) -> tuple[list[tuple[tuple[str, str, int], ...]],
                                                                                list[Problem]]:
    """Every combination of the matrix's values, as (key as written, dotted path, value index) triples."""
    problems = []
    axes: list[list[tuple[str, str, int]]] = []
    for written, values in matrix.items():
        dotted_path = MATRIX_SHORTHANDS.get(written, written)
        if dotted_path.split(".")[0] in SHARED_ONLY or not _schema_has(dotted_path):
            line, col = locate(root, ["matrix", written], key=True)
            choices = [*MATRIX_SHORTHANDS, *_leaf_paths(load_schema(), "")]
            problems.append(Problem(line, col, f"matrix.{written}", f"not a pipeline key{suggest(written, choices)}; "
                                    "a matrix spans pipeline keys (dotted, like vm.memory), or release and arch"))
            continue
        if len(set(map(str, values))) != len(values):
            line, col = locate(root, ["matrix", written])
            problems.append(Problem(line, col, f"matrix.{written}", "a value is listed twice"))
        axes.append([(written, dotted_path, index) for index in range(len(values))])
    combinations = math.prod(len(axis) for axis in axes)
    if combinations > MAX_IMAGES:  # counted before expanding: ten keys of ten values are 10^10 images
        line, col = locate(root, ["matrix"])
        problems.append(Problem(line, col, "matrix", f"{combinations:,} combinations; a file describes at most "
                                f"{MAX_IMAGES} images"))
        return [()], problems
    cells: list[tuple[tuple[str, str, int], ...]] = [()]
    for axis in axes:
        cells = [(*cell, choice) for cell in cells for choice in axis]
    return cells, problems


def _leaf_paths(node: dict[str, Any], prefix: str) -> list[str]:
    paths = []
    for key, sub in node.get("properties", {}).items():
        if key in SHARED_ONLY:
            continue
        paths += _leaf_paths(sub, f"{prefix}{key}.") if "properties" in sub else [f"{prefix}{key}"]
    return paths


def _name_part(value: Any) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", str(value).lower()).strip("-") or "x"


def plan_images(document: dict[str, Any], root: yaml.Node | None) -> tuple[list[ImagePlan], list[Problem]]:
    """The images a (schema-valid) document describes, parents first, and what is wrong with their structure:
    unknown matrix keys, duplicate names, a ``from:`` naming no image or closing a cycle, keys only the
    file as a whole may set."""
    shared = {key: value for key, value in document.items() if key not in ("matrix", "images")}
    family = str(fill_defaults(document, load_schema())["name"])
    matrix = document.get("matrix") or {}
    cells, problems = _matrix_cells(matrix, root)
    entries = document.get("images") or [{"name": family}]
    if len(entries) * len(cells) > MAX_IMAGES:
        line, col = locate(root, ["images"])
        problems.append(Problem(line, col, "images", f"{len(entries)} entries x {len(cells)} matrix combinations "
                                f"are {len(entries) * len(cells):,} images; a file describes at most {MAX_IMAGES}"))
        return [], problems
    entry_names = [str(entry["name"]) for entry in entries]
    plans: dict[str, ImagePlan] = {}
    for index, entry in enumerate(entries):
        entry_index = index if "images" in document else None
        for key in entry:
            if key in SHARED_ONLY and key != "name":
                line, col = locate(root, ["images", index, key], key=True)
                problems.append(Problem(line, col, f"images[{index}].{key}",
                                        f"{key}: is shared by every image of the file; set it at the top level"))
        parent = entry.get("from")
        if parent is not None and parent not in entry_names:
            line, col = locate(root, ["images", index, "from"])
            problems.append(Problem(line, col, f"images[{index}].from",
                                    f"no image named {parent!r} in this file{suggest(str(parent), entry_names)}; "
                                    f"its images: {', '.join(entry_names)}"))
            parent = None
        overrides = {key: value for key, value in entry.items() if key not in ("name", "from")}
        for written in matrix:
            spanned: list[str | int] = list(MATRIX_SHORTHANDS.get(written, written).split("."))
            if _has_path(overrides, spanned):
                line, col = locate(root, ["images", index, *spanned], key=True)
                problems.append(Problem(line, col, dotted(["images", index, *spanned]),
                                        f"the matrix spans {written} already; an image cannot set it too (its "
                                        "name would say one value and the image hold another)"))
        for cell in cells:
            suffix = "".join(f"-{_name_part(matrix[written][i])}" for written, _, i in cell)
            merged = shared
            for written, dotted_path, i in cell:
                merged = _set_dotted(merged, dotted_path, matrix[written][i])
            merged = {**deep_merge(merged, overrides), "name": f"{entry['name']}{suffix}"}
            name = merged["name"]
            if name in plans:
                line, col = locate(root, ["images", index, "name"] if entry_index is not None else ["name"])
                problems.append(Problem(line, col, "images" if entry_index is not None else "name",
                                        f"two images would be named {name!r}; give each entry its own name"))
                continue
            plans[name] = ImagePlan(name, f"{parent}{suffix}" if parent else None, merged, entry_index, overrides,
                                    cell)
    ordered, cycle_problems = _parents_first(plans, root)
    return ordered, problems + cycle_problems


def _parents_first(plans: dict[str, ImagePlan], root: yaml.Node | None) -> tuple[list[ImagePlan], list[Problem]]:
    ordered: list[ImagePlan] = []
    done: set[str] = set()
    problems = []
    for plan in plans.values():
        chain: list[ImagePlan] = []
        current: ImagePlan | None = plan
        while current is not None and current.name not in done:
            if current in chain:
                cycle = " -> ".join(p.name for p in chain[chain.index(current):]) + f" -> {current.name}"
                line, col = locate(root, ["images", current.entry_index or 0, "from"])
                problems.append(Problem(line, col, f"images[{current.entry_index}].from",
                                        f"from: makes a cycle ({cycle}); an image cannot be built on itself"))
                return ordered, problems
            chain.append(current)
            current = plans.get(current.parent) if current.parent else None
        for member in reversed(chain):
            done.add(member.name)
            ordered.append(member)
    return ordered, problems


def _parent_problems(plan: ImagePlan, child: dict[str, Any], parent: dict[str, Any],
                     where: Locator) -> list[Problem]:
    """A child boots its parent's image: it must be the same OS on the same architecture (both filled)."""
    problems = []
    for key in ("arch", "release"):
        if str(child["source"][key]) != str(parent["source"][key]):
            line, col = where(["source", key])
            problems.append(Problem(line, col, f"source.{key}",
                                    f"{child['source'][key]} differs from {parent['source'][key]} of {plan.parent!r}, "
                                    "which this image is built from (from:); a layered image has its parent's "
                                    "release and arch"))
    return problems


def _file_problems(document: dict[str, Any], where: Locator, base: Path) -> list[Problem]:
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
        try:
            resolved = _resolve(base, value)
            missing = resolved is not None and not resolved.is_file()
            reason = f"file not found: {resolved} (paths are relative to the pipeline's folder)"
        except OSError as err:  # a symlink loop (see _resolve)
            missing, reason = True, f"cannot follow this path: {err}"
        if missing:
            line, col = where(path)
            problems.append(Problem(line, col, dotted(path), reason))
    problems += _test_problems(filled["test"], where)
    release = str(filled["source"]["release"])
    if release not in RELEASES and release not in RELEASES.values():
        line, col = where(["source", "release"])
        known = ", ".join(f"{codename} ({version})" for version, codename in RELEASES.items())
        problems.append(Problem(line, col, "source.release",
                                f"unknown Ubuntu release {release!r}"
                                f"{suggest(release, [*RELEASES, *RELEASES.values()])}; known: {known}"))
    return problems


def _test_problems(test: dict[str, Any], where: Locator) -> list[Problem]:
    """What the schema cannot say about test.forward and test.upload."""
    problems = []
    guests: set[int] = set()
    hosts: set[int] = set()
    for index, item in enumerate(test["forward"]):
        forward = parse_forward(item)
        reason = None
        if max(forward.host, forward.guest) > 65535:
            reason = f"{item!r}: a TCP port is at most 65535"
        elif forward.guest == 22:
            reason = "guest port 22 is forwarded already (SSH); cloudbake prints and hands over its host port"
        elif forward.guest in guests:
            reason = f"guest port {forward.guest} is forwarded twice"
        elif forward.host and forward.host in hosts:
            reason = (f"host port {forward.host} is named twice; QEMU cannot listen on one port for two guest "
                      "ports (leave the host port out to get a free one)")
        guests.add(forward.guest)
        hosts.add(forward.host)
        if reason:
            line, col = where(["test", "forward", index])
            problems.append(Problem(line, col, dotted(["test", "forward", index]), reason))
    if isinstance(test["upload"], list):
        for index, pattern in enumerate(test["upload"]):
            if os.path.isabs(pattern) or ".." in Path(pattern).parts:
                line, col = where(["test", "upload", index])
                problems.append(Problem(line, col, dotted(["test", "upload", index]),
                                        f"{pattern!r} leaves the pipeline's folder; upload paths are relative to "
                                        "it and stay inside it"))
    return problems


def parse_forward(item: int | str) -> Forward:
    """``8080`` or ``"18080:8080"`` (host:guest), as the schema admits them."""
    host, _, guest = str(item).rpartition(":")
    return Forward(int(host) if host else 0, int(guest))


def freeze_remote(cache: dict[str, Any], base: Path) -> RemoteCache | None:
    if not cache["remote"]:
        return None
    registry, repository = parse_remote(cache["remote"])
    # CI turns pushing on for one branch without a second pipeline file.
    push = cache["push"] or os.environ.get("CLOUDBAKE_PUSH", "").strip().lower() in ("1", "true", "yes")
    return RemoteCache(registry=registry, repository=repository, push=push, tag_latest=cache["tag_latest"],
                       plain_http=cache["plain_http"], ca_file=_resolve(base, cache["ca_file"]))


def freeze(doc: dict[str, Any], file: Path, *, parent: Pipeline | None = None, family: str = "",
           lock_file: Path | None = None) -> Pipeline:
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
        disk=Disk(size=parse_disk_size(disk["size"]), compression=Compression(disk["compression"]),
                  flatten=disk["flatten"]),
        vm=VM(
            cpus=vm["cpus"],
            memory_bytes=parse_size(vm["memory"]),
            accel=Accel(vm["accel"]),
            firmware=Firmware(vm["firmware"]),
            timeout_s=parse_duration(vm["timeout"]),
            qemu_args=tuple(vm["qemu_args"]),
            bake_qemu_args=tuple(vm["bake_qemu_args"]),
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
            upload=None if test["upload"] is False else "git" if test["upload"] == "git" else tuple(test["upload"]),
            workdir=test["workdir"],
            env=tuple(sorted(test["env"].items())),
            forward=tuple(parse_forward(item) for item in test["forward"]),
            warm=test["warm"],
            timeout_s=parse_duration(test["timeout"]),
            artifacts=tuple(test["artifacts"]),
            artifacts_max_bytes=parse_size(test["artifacts_max"]),
            parallel=test["parallel"],
            shards=test["shards"],
        ),
        output_dir=output_dir,
        output_keep=doc["output"]["keep"],
        build_dir=build_dir,
        cache_dir=cache_dir,
        remote=freeze_remote(doc["cache"], base),
        raw=doc,
        parent=parent,
        family=family or doc["name"],
        lock_file=lock_file or file.resolve().with_suffix(".lock"),
    )
