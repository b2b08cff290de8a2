"""The pipeline that this doit run works on, loaded once."""

from __future__ import annotations

import functools
from pathlib import Path

from doit import get_var
from doit.exceptions import InvalidDodoFile

from tasks.errors import PipelineError
from tasks.paths import Paths, resolve_paths
from tasks.pipeline import Pipeline, load_pipeline

DEFAULT_PIPELINE = "pipeline.yaml"


@functools.cache
def _load(file: str) -> tuple[Pipeline, Paths]:
    try:
        pipeline = load_pipeline(Path(file))
    except PipelineError as err:
        # doit prints InvalidDodoFile as "ERROR: ..." and exits 3, without a traceback.
        raise InvalidDodoFile(str(err)) from None
    return pipeline, resolve_paths(pipeline)


def current() -> tuple[Pipeline, Paths]:
    """The pipeline named by ``doit ... pipeline=PATH`` (default pipeline.yaml) and its paths."""
    return _load(str(get_var("pipeline", DEFAULT_PIPELINE) or DEFAULT_PIPELINE))
