"""The ``images:`` and ``matrix:`` plan: one merged document per image of a file, each value's position
remembered, parents ordered before the images built on them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from cloudbake.config.problems import fill_defaults, load_schema
from cloudbake.config.yamlfile import Problem, dotted, locate, suggest

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


def parse_dotted(path: str) -> list[str | int]:
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
        parent, entry_problems = _entry_problems(entry, index, entry_names, matrix, root)
        problems += entry_problems
        overrides = {key: value for key, value in entry.items() if key not in ("name", "from")}
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


def _entry_problems(entry: dict[str, Any], index: int, entry_names: list[str], matrix: dict[str, list[Any]],
                    root: yaml.Node | None) -> tuple[str | None, list[Problem]]:
    """One ``images:`` entry's parent (None when it names no image of the file) and what is wrong with it:
    keys only the file may set, a ``from:`` naming no image, a key the matrix spans set again."""
    problems = []
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
    return (str(parent) if parent is not None else None), problems


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


def parent_problems(plan: ImagePlan, child: dict[str, Any], parent: dict[str, Any],
                     where: Locator) -> list[Problem]:
    """A child boots its parent's image: it must be the same OS on the same architecture (both filled)."""
    problems = []
    for key in ("distro", "arch", "release"):
        if str(child["source"].get(key, "ubuntu")) != str(parent["source"].get(key, "ubuntu")):
            line, col = where(["source", key])
            problems.append(Problem(line, col, f"source.{key}",
                                    f"{child['source'][key]} differs from {parent['source'][key]} of {plan.parent!r}, "
                                    "which this image is built from (from:); a layered image has its parent's "
                                    "distribution, release and arch"))
    return problems

