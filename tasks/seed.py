"""seed: the NoCloud seed ISO (cidata) built from cloud-init/ and the pipeline."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from cloudbake.config.model import Pipeline
from cloudbake.core.errors import PipelineError

from .context import Image, per_image
from .doitutil import doit_action, engine, value_changed
from .verbs import SUMMARIES


def seed_inputs(pipeline: Pipeline) -> list[str]:
    """Files the seed depends on, for doit's file_dep."""
    ci = pipeline.cloud_init
    deps = [ci.user_data, ci.network_config, ci.vendor_data, pipeline.file]
    return [str(p) for p in deps if p is not None]


def _seed_fingerprint(pipeline: Pipeline) -> str:
    from cloudbake.image.seed import resolve_authorized_keys, source_date_epoch

    try:
        keys = resolve_authorized_keys(pipeline.cloud_init.ssh_authorized_keys, pipeline.file.parent, warn=False)
        epoch = source_date_epoch()
    except PipelineError as err:
        return f"error: {err}"  # never equal to a stored value: the action runs and reports it
    return hashlib.sha256(("\n".join(keys) + f"\n{epoch}").encode()).hexdigest()


def _seed_task(image: Image) -> dict[str, Any]:
    pipeline, paths = image.pipeline, image.paths
    return {
        "doc": SUMMARIES["seed"],
        "file_dep": seed_inputs(pipeline),
        "targets": [str(paths.seed_iso)],
        # Keys named by path or glob change outside file_dep: check their content.
        "uptodate": [value_changed("seed", lambda: _seed_fingerprint(pipeline))],
        "actions": [(doit_action(engine("cloudbake.image.seed:run_seed")), [pipeline, paths])],
        "clean": True,
    }


def task_seed() -> dict[str, Any] | Iterator[dict[str, Any]]:
    return per_image("seed", _seed_task)
