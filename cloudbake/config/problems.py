"""Schema problems: the pipeline schema, validation with every problem at once (sorted, located,
the closest branch of a ``oneOf`` explained, did-you-mean for unknown keys), and the schema's
defaults filled in.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema
import yaml

from cloudbake.config.schemas import pipeline_schema_path
from cloudbake.config.yamlfile import Problem, dotted, duplicate_keys, locate, suggest
from cloudbake.core.units import parse_disk_size, parse_duration, parse_size


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
    problems: list[Problem] = list(duplicate_keys(root, []))
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


