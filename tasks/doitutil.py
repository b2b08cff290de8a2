"""doit glue: the edge where engine errors become doit failures, a cheap file checker, lazy up-to-date values."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

from doit.dependency import FileChangedChecker
from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from cloudbake.core.errors import Interrupted, MachineryError, PipelineError, stop_signals_unwind
from cloudbake.core.exits import Exit

# How the last failed action failed, so the cloudbake command exits with that kind's status
# (doit itself only says 1: "a task failed").
failure_status: list[Exit] = []


class SizeMtimeChecker(FileChangedChecker):  # type: ignore[misc]
    """A file counts as changed when its size or mtime_ns changed.

    doit's default MD5 checker re-hashes a file whenever its mtime moves, and keeps
    re-hashing it on every later run when the content is unchanged; for multi-GB
    images that costs seconds per run. Size and nanosecond mtime are enough here:
    every writer in cloudbake replaces files by rename.
    """

    def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
        return bool(state != self.get_state(file_path, None))

    def get_state(self, dep: str, current_state: Any) -> Any:
        stat = os.stat(dep)
        return [stat.st_size, stat.st_mtime_ns]


class described:  # noqa: N801 (doit's own uptodate helpers are lower-case classes)
    """An up-to-date check that says in words what it checks: ``doit info`` prints it."""

    def __init__(self, sentence: str, check: Callable[[], bool]) -> None:
        self.sentence = sentence
        self.check = check

    def __call__(self) -> bool:
        return self.check()

    def __repr__(self) -> str:
        return f"up to date when {self.sentence}"


class value_changed:  # noqa: N801 (doit's own uptodate helpers are lower-case classes)
    """Up-to-date while ``compute()`` returns what it returned at the last success.

    Unlike doit's config_changed, the value is computed when doit checks the task,
    not when the task is described, so describing tasks stays free of I/O.
    """

    def __init__(self, name: str, compute: Callable[[], str]) -> None:
        self.key = f"_value_changed:{name}"
        self.compute = compute
        self.value: str | None = None

    def configure_task(self, task: Any) -> None:
        task.value_savers.append(lambda: {self.key: self.value})

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        self.value = self.compute()
        return values.get(self.key) == self.value


def engine(target: str) -> Callable[..., Any]:
    """The engine function ``module:name``, imported when doit runs it, so describing tasks (``doit list``,
    ``doit help``) imports no HTTP, registry or VM code. Only for functions that take no task options:
    doit passes options by the action's parameter names, which this wrapper cannot show."""
    module_name, _, name = target.partition(":")

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module_name), name)(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{target}, imported when called"
    return call


def doit_action(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task action so a PipelineError reaches the user as a clean doit failure."""

    @functools.wraps(func)
    def action(*args: Any, **kwargs: Any) -> Any:
        try:
            with stop_signals_unwind():
                result = func(*args, **kwargs)
        except PipelineError as err:
            from cloudbake.core.log import redact

            failure_status.append(Exit.machinery if isinstance(err, MachineryError) else Exit.failed)
            return TaskFailed(redact(str(err)))
        except KeyboardInterrupt as err:
            what = err.signal_name if isinstance(err, Interrupted) else "Ctrl-C"
            failure_status.append(Exit.interrupted)
            return TaskFailed(f"interrupted ({what}); the guest and its work files were cleaned up")
        except BrokenPipeError:
            # The reader of stdout went away (`cloudbake status | head -1`): stop quietly, as SIGPIPE would.
            from cloudbake.core.files import silence_stdout

            silence_stdout()
            raise SystemExit(Exit.output_closed) from None
        # doit treats only None, True, dict and str as success; stage functions may return paths.
        return result if isinstance(result, dict) else None

    return action


class StderrReporter(ConsoleReporter):  # type: ignore[misc]
    """doit's console reporter writing to stderr: a task's title (``.  status``) and failures are
    the log, so stdout holds only what the task prints (``cloudbake status --json``, ``cache-key``)."""

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        import sys

        super().__init__(sys.stderr, options)
