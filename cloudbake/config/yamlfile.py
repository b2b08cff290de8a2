"""Reading YAML safely and saying where things are in it: depth and alias-expansion limits checked
before PyYAML builds anything, YAML 1.2 booleans, duplicate keys, and the line and column of any
path of the document (``locate``) for ``Problem``s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cloudbake.core.errors import PipelineError

# --- locating problems in the YAML -------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem of a YAML file, at its line and column, under its dotted path."""

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
    import difflib  # only when there is a problem to explain

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def duplicate_keys(node: yaml.Node | None, path: list[str | int]) -> Iterator[Problem]:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                mark = key_node.start_mark
                yield Problem(mark.line + 1, mark.column + 1, dotted([*path, key]),
                              "duplicate key: only one value would be used; remove one of them")
            seen.add(key)
            yield from duplicate_keys(value_node, [*path, key])
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from duplicate_keys(item, [*path, index])



# A config file nests a handful of levels; thousands only come from hostile input, and
# PyYAML's composer recurses once per level.
MAX_YAML_DEPTH = 64
# Aliases let a few lines stand for billions of nodes ("billion laughs"); a real config has
# a few hundred. Counted on the node graph before anything is expanded.
MAX_YAML_NODES = 100_000
_NESTING_OPENERS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
                    yaml.FlowSequenceStartToken)
_NESTING_CLOSERS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


# libyaml's scanner and parser where PyYAML was built with it (its wheels are), else PyYAML's own:
# the same tokens, nodes and marks, several times faster. Construction stays PyYAML's (safe).
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Yaml12BooleansLoader(_SafeLoader):  # type: ignore[valid-type, misc]
    """SafeLoader that reads only true/false as booleans (YAML 1.2), so `signature: off` is the word 'off'."""


_Yaml12BooleansLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BooleansLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _check_depth(text: str, file: Path) -> None:
    depth = 0
    try:
        for token in yaml.scan(text, Loader=_SafeLoader):  # the scanner is iterative: safe at any depth
            if isinstance(token, _NESTING_OPENERS):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    _too_deep(token.start_mark, file)
            elif isinstance(token, _NESTING_CLOSERS):
                depth -= 1
    except yaml.MarkedYAMLError as err:
        if "nesting depth" not in str(err.problem) or err.problem_mark is None:
            raise
        _too_deep(err.problem_mark, file)   # libyaml's own, lower-level limit said the same way


def _too_deep(mark: Any, file: Path) -> None:
    raise PipelineError(f"{file}:{mark.line + 1}:{mark.column + 1}: nested more than {MAX_YAML_DEPTH} levels deep",
                        hint="a configuration never needs this much nesting; check the file")


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
    loader_class = _Yaml12BooleansLoader if yaml12_booleans else _SafeLoader
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

