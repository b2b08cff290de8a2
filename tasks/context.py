"""The pipeline a command works on, loaded once, and doit's configuration for it."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

from doit import doit_cmd, get_var
from doit.exceptions import InvalidDodoFile

from cloudbake.errors import PipelineError
from cloudbake.paths import Paths, resolve_paths
from cloudbake.pipeline import Pipeline, load_pipeline

from .doitutil import SizeMtimeChecker

DEFAULT_PIPELINE = "pipeline.yaml"
# Every `name=value` a command line may carry; anything else is a typo to report, not ignore.
KNOWN_VARIABLES = {
    "pipeline": "the pipeline file (default pipeline.yaml)",
    "cmd": "test-image: the command to run instead of test.command",
    "keep": "test-image: keep the VM running afterwards (1)",
    "downgrade": "update: accept an older signed upstream image (1)",
}
_default_pipeline = DEFAULT_PIPELINE


def set_default_pipeline(path: str) -> None:
    """The pipeline file when the command line names none (the ``cloudbake -p PATH`` option)."""
    global _default_pipeline
    _default_pipeline = path


def flag(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def check_variables() -> None:
    """Refuse unknown ``name=value`` arguments (a typo like ``pipline=x.yaml`` would silently do nothing)."""
    given = doit_cmd._CMDLINE_VARS or {}  # doit keeps them here; get_var() reads the same dict
    for name in sorted(given):
        if name not in KNOWN_VARIABLES:
            close = difflib.get_close_matches(name, list(KNOWN_VARIABLES), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = "; ".join(f"{k}= {v}" for k, v in KNOWN_VARIABLES.items())
            if " " in name:  # not a name at all: an option's value that holds '=' (doit reads those as variables)
                hint = (" (doit reads every argument holding '=' as a variable, even after --cmd: write "
                        f"cmd='{name}={given[name]}' instead)")
            raise InvalidDodoFile(f"unknown variable '{name}={given[name]}'{hint}; known: {known}")


@functools.cache
def _load(file: str) -> tuple[Pipeline, Paths]:
    try:
        pipeline = load_pipeline(Path(file))
    except PipelineError as err:
        # doit prints InvalidDodoFile as "ERROR: ..." and exits 3, without a traceback.
        raise InvalidDodoFile(str(err)) from None
    return pipeline, resolve_paths(pipeline)


def current() -> tuple[Pipeline, Paths]:
    """The pipeline named by ``pipeline=PATH`` (else the default) and its paths."""
    check_variables()
    return _load(str(get_var("pipeline", None) or _default_pipeline))


def doit_config() -> dict[str, Any]:
    """DOIT_CONFIG for the current pipeline: its own state file, cheap file checks, tasks' output shown."""
    _, paths = current()
    return {
        "default_tasks": ["bake"],
        "backend": "sqlite3",
        "dep_file": str(paths.doit_state),
        "check_file_uptodate": SizeMtimeChecker,
        "verbosity": 2,
    }
