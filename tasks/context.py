"""The pipeline a command works on, loaded once, and doit's configuration for it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit import doit_cmd, get_var
from doit.exceptions import InvalidDodoFile

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths, resolve_paths
from cloudbake.config.pipeline import load_images
from cloudbake.core.errors import PipelineError

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
            import difflib

            close = difflib.get_close_matches(name, list(KNOWN_VARIABLES), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = "; ".join(f"{k}= {v}" for k, v in KNOWN_VARIABLES.items())
            if " " in name:  # not a name at all: an option's value that holds '=' (doit reads those as variables)
                hint = (" (doit reads every argument holding '=' as a variable, even after --cmd: write "
                        f"cmd='{name}={given[name]}' instead)")
            raise InvalidDodoFile(f"unknown variable '{name}={given[name]}'{hint}; known: {known}")


@dataclass(frozen=True)
class Image:
    """One image of the pipeline file, as the task definitions see it."""

    pipeline: Pipeline
    paths: Paths
    several: bool   # the file describes more than one image: each task is a subtask named after it

    def task(self, basename: str) -> str:
        """This image's task ``basename``: ``bake``, or ``bake:<image>`` in a file of several images."""
        return f"{basename}:{self.pipeline.name}" if self.several else basename


@functools.cache
def _load(file: str) -> tuple[Image, ...]:
    try:
        pipelines = load_images(Path(file))
    except PipelineError as err:
        # doit prints InvalidDodoFile as "ERROR: ..." and exits 3, without a traceback.
        raise InvalidDodoFile(str(err)) from None
    return tuple(Image(pipeline, resolve_paths(pipeline), len(pipelines) > 1) for pipeline in pipelines)


def current_images() -> tuple[Image, ...]:
    """Every image of the pipeline named by ``pipeline=PATH`` (else the default), parents first."""
    check_variables()
    return _load(str(get_var("pipeline", None) or _default_pipeline))


def current() -> tuple[Pipeline, Paths]:
    """The first image of the current pipeline and its paths (all images of a file share doit's state)."""
    first = current_images()[0]
    return first.pipeline, first.paths


def per_image(basename: str, make: Callable[[Image], dict[str, Any]], *,
              only: Callable[[Image], bool] = lambda image: True) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """The task ``basename`` of a one-image file, or one subtask per image (``bake:noble-arm64``; ``doit bake``
    runs them all). ``only`` leaves images out (layered images fetch nothing)."""
    images = current_images()
    if not images[0].several:
        return make(images[0])

    def subtasks() -> Iterator[dict[str, Any]]:
        chosen = [image for image in images if only(image)]
        if chosen:
            first = make(chosen[0])
            yield {"basename": basename, "name": None, "doc": first["doc"] + " (every image; :<image> for one)"}
        for image in chosen:
            task = make(image)
            task.pop("basename", None)
            yield {**task, "basename": basename, "name": image.pipeline.name}
    return subtasks()


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
