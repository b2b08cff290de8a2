"""cloudbake: a declarative pipeline that bakes and tests VM base images (driven by doit).

``with cloudbake.vm("pipeline.yaml") as vm:`` gives a throwaway VM of the baked image (cloudbake.api).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["CommandFailedError", "MachineryError", "PipelineError", "vm"]

# The errors the API raises, importable from here (light: no VM code is imported for them).
from cloudbake.core.errors import MachineryError, PipelineError

if TYPE_CHECKING:
    from cloudbake.api import vm
    from cloudbake.run.ssh import CommandFailedError
else:
    def __getattr__(name):
        if name == "CommandFailedError":
            from cloudbake.run.ssh import CommandFailedError

            return CommandFailedError
        raise AttributeError(f"module 'cloudbake' has no attribute {name!r}")

    def vm(*args, **kwargs):
        """A throwaway VM of the baked image (cloudbake.api.vm), imported on use: ``import cloudbake`` stays light."""
        from cloudbake.api import vm as _vm

        return _vm(*args, **kwargs)
