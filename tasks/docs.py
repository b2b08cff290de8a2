"""Generated docs: docs/configuration.md from the schema, and the walk-throughs in docs/guide.md from the
argv builder (tests fail when either is stale)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloudbake.config.problems import load_schema
from cloudbake.config.schemas import pipeline_schema_path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

REFERENCE = PROJECT_ROOT / "docs" / "configuration.md"
GUIDE = PROJECT_ROOT / "docs" / "guide.md"


def _type_of(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        kind = f"list of {node.get('items', {}).get('type', 'any')}"
    fmt = node.get("format", "")
    if fmt.startswith("cloudbake-"):
        kind += f" ({fmt.removeprefix('cloudbake-').replace('-', ' ')})"
    return str(kind)


def _rows(node: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        if "properties" in sub:
            rows.append(f"| **`{path}`** | section | | {sub['description']} |")
            rows += _rows(sub, path + ".")
        else:
            default = json.dumps(sub.get("default")) if "default" in sub else ""
            rows.append(f"| `{path}` | {_type_of(sub)} | `{default}` | {sub['description']} |")
    return rows


def render_configuration_reference() -> str:
    schema = load_schema()
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from schema/pipeline.schema.json by `doit docs`; do not edit by hand. -->",
        "",
        schema["description"],
        "",
        "Relative paths resolve against the folder of the pipeline file. Sizes take binary units "
        "(`512M`, `2G`, `1.5GiB`); durations take `90s`, `30m`, `1h30m`. Select another pipeline "
        "file with `doit <task> pipeline=PATH`.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
        *_rows(schema, ""),
        "",
        *_distributions(),
    ]
    return "\n".join(lines)


def _distributions() -> list[str]:
    """What ``source.*`` means per distribution, from the table the pipeline is checked against."""
    from cloudbake.config.distros import DISTROS

    lines = [
        "## Distributions",
        "",
        "`source.release` and `source.channel` are checked at load against these values.",
        "",
        "| `source.distro` | releases | channels | default mirror | checksums trusted by | cloud-init's own user |",
        "|---|---|---|---|---|---|",
    ]
    for distro, facts in DISTROS.items():
        releases = ", ".join(f"`{codename}` ({version})" if codename != version else f"`{version}`"
                             for version, codename in facts.releases.items())
        if facts.signed:
            keys = "; ".join(f"{release}: `{' '.join(fps)}`" if release != "*" else f"`{' '.join(fps)}`"
                             for release, fps in facts.fingerprints.items())
            trust = f"an OpenPGP signature by the pinned key ({keys})"
        else:
            trust = ("nothing: `verify.signature: none` is required; TLS to the mirror and the first fetch, "
                     "then the lock")
        lines.append(f"| `{distro}` | {releases} | `current`, or a build such as `{facts.channel_example}` | "
                     f"`{facts.mirror}` | {trust} | `{facts.default_user}` |")
    lines.append("")
    return lines


def write_configuration_reference(dest: Path = REFERENCE) -> None:
    dest.write_text(render_configuration_reference(), encoding="utf-8")


def write_guide(dest: Path = GUIDE) -> None:
    from cloudbake.image.explain import fill_generated

    dest.write_text(fill_generated(dest.read_text(encoding="utf-8")), encoding="utf-8")


def task_docs() -> dict[str, Any]:
    return {
        "doc": "Regenerate docs/configuration.md from the schema and the generated parts of docs/guide.md",
        "file_dep": [str(pipeline_schema_path())],
        "targets": [str(REFERENCE)],
        "actions": [write_configuration_reference, write_guide],
        "uptodate": [False],
    }
