"""The Python API: a throwaway VM of a pipeline's baked image, for harnesses and test frameworks.

    import cloudbake

    with cloudbake.vm("pipeline.yaml") as vm:
        vm.run("make check", check=True)
        print(vm.run("uname -r").stdout)
        vm.put("fixtures/", "~/fixtures")
        vm.get("/var/log/syslog", "out/syslog")
        url = f"http://127.0.0.1:{vm.port(8080)}/"

It is the same Machine that ``cloudbake test-image`` uses: the same overlay, keys, pinned
host key, upload, environment and clean-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.run.machine import Machine


@contextlib.contextmanager
def vm(pipeline: str | Path | Pipeline = "pipeline.yaml", *, upload: bool = True, env: dict[str, str] | None = None,
       timeout: float | None = None, warm: bool | None = None, label: str = "api",
       image: str | None = None) -> Iterator[Machine]:
    """Boot a throwaway VM of the pipeline's baked image and yield it ready; it is gone when the block ends.

    The public API: every parameter after ``pipeline`` is a keyword option with the default a
    test wants, listed below.

    pipeline: the pipeline file (or a loaded Pipeline). The image must be baked already
        (``cloudbake bake``); a missing one raises MachineryError (stage ``base image``).
    upload: send ``test.upload`` (by default the git work tree holding the pipeline) into
        ``test.workdir`` before yielding. Recommended: True, so commands see the code under test.
    env: extra environment for every command, on top of ``test.env``.
    timeout: seconds for the boot and, separately, for each command or copy (default test.timeout).
    warm: resume from the image's saved state instead of booting (default test.warm, normally
        True); the first warm VM of an image saves that state (one boot).
    image: which image, when the pipeline file describes several (``matrix:``, ``images:``).

    Raises MachineryError (a PipelineError) naming the stage when the machinery fails; a
    command's failure is its status in ``vm.run(...)``'s result, or CommandFailedError with
    ``check=True``.
    """
    loaded = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(Path(pipeline), image)
    machine = Machine(loaded, resolve_paths(loaded), label=label, timeout_s=timeout, env=env, timeout_per_step=True,
                      warm=warm)
    with machine:
        if upload:
            machine.upload_project()
        yield machine
