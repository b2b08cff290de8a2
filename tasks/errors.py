"""The one error type users see, and the edge where it becomes a doit failure."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from doit.exceptions import TaskFailed


class PipelineError(Exception):
    """A problem the user can fix: bad input, a missing tool, a failed guest.

    ``hint`` says what to do next. Genuine bugs raise other exceptions and keep
    their traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


def doit_action(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task action so a PipelineError reaches the user as a clean doit failure."""

    @functools.wraps(func)
    def action(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
        except PipelineError as err:
            return TaskFailed(str(err))
        except KeyboardInterrupt:
            return TaskFailed("interrupted (Ctrl-C); the guest and its work files were cleaned up")
        # doit treats only None, True, dict and str as success; stage functions may return paths.
        return result if isinstance(result, dict) else None

    return action
