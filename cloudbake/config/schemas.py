"""Where cloudbake's schema files are: inside the installed package, or in a checkout's schema/ folder."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # cloudbake/


def schema_dir() -> Path:
    """``cloudbake/schema`` in an installed wheel (the build maps schema/ there), else the checkout's schema/."""
    installed = _PACKAGE / "schema"
    if (installed / "pipeline.schema.json").is_file():
        return installed
    return _PACKAGE.parent / "schema"


def pipeline_schema_path() -> Path:
    return schema_dir() / "pipeline.schema.json"


def cloud_config_schema_path() -> Path:
    """cloud-init's own schema, vendored at a pinned version (schema/cloud-init/README.md)."""
    return schema_dir() / "cloud-init" / "schema-cloud-config-v1.json"
