"""The ``cloudbake`` command: cloudbake's doit tasks in any folder, without a dodo.py.

    cloudbake list                  the tasks (doit's own commands all work: info, clean, help ...)
    cloudbake bake                  bake ./pipeline.yaml's image
    cloudbake -p ci.yaml test-image --cmd "make check"    exits with the command's status
    cloudbake up / ssh / ps / down   throwaway VMs for people and harnesses (cloudbake.run.commands)

doit underneath, the way Nikola wraps doit: DoitMain with a task loader that hands doit the
task definitions of ``cloudbake.tasks`` (this repository's tasks/ folder, mapped into the
wheel), so ``doit <task>`` in this repository and ``cloudbake <task>`` anywhere run the same
definitions.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

TASK_MODULES = ("fetch", "seed", "bake", "testrun", "inspect", "registry")
# cloudbake's own commands (cloudbake.run.commands), beside doit's: imported only when one runs, so
# `cloudbake --help` and `cloudbake list` import no VM code.
VM_COMMANDS = ("test-image", "up", "ssh", "ps", "down")
USAGE = "usage: cloudbake [-p PIPELINE] [doit command] [task] [options]   (cloudbake help: doit's help)"


def task_definitions() -> tuple[ModuleType, list[ModuleType]]:
    """The context module and the task modules: ``cloudbake.tasks`` when installed, else a checkout's tasks/."""
    try:
        package = "cloudbake.tasks"
        importlib.import_module(package)
    except ModuleNotFoundError:
        package = "tasks"  # a checkout run without installing (PYTHONPATH=.)
    context = importlib.import_module(f"{package}.context")
    return context, [importlib.import_module(f"{package}.{name}") for name in TASK_MODULES]


def split_pipeline_option(argv: list[str]) -> tuple[str | None, list[str]]:
    """(``-p``/``--pipeline`` value or None, the rest for doit). Pure, so tests read it as the CLI."""
    rest: list[str] = []
    pipeline: str | None = None
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-p", "--pipeline") and pipeline is None:
            if index + 1 >= len(argv):
                raise SystemExit(f"cloudbake: {arg} needs a file\n{USAGE}")
            pipeline = argv[index + 1]
            index += 2
            continue
        if arg.startswith("--pipeline=") and pipeline is None:
            pipeline = arg.split("=", 1)[1]
        elif arg == "--cmd" and index + 1 < len(argv):
            # doit reads every argument holding '=' as a variable, option values too, so a
            # command like `dd if=/dev/zero` would never reach --cmd: hand it over as cmd=...
            rest.append(f"cmd={argv[index + 1]}")
            index += 1
        elif arg.startswith("--cmd="):
            rest.append("cmd=" + arg.removeprefix("--cmd="))
        else:
            rest.append(arg)
        index += 1
    return pipeline, rest


class _Loader(ModuleTaskLoader):  # type: ignore[misc]
    """doit's module loader, with DOIT_CONFIG computed when doit asks for it (after the pipeline is known)."""

    def __init__(self, namespace: dict[str, Any], context: ModuleType) -> None:
        super().__init__(namespace)
        self._context = context

    def load_doit_config(self) -> dict[str, Any]:
        config: dict[str, Any] = self._context.doit_config()
        return config


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    context, modules = task_definitions()
    namespace = {name: getattr(module, name) for module in modules for name in dir(module)
                 if name.startswith("task_")}

    def doit(doit_argv: list[str]) -> int:
        result: int = DoitMain(_Loader(namespace, context)).run(doit_argv)
        return result

    command_at = next((i for i, arg in enumerate(args) if not arg.startswith("-")
                       and (i == 0 or args[i - 1] not in ("-p", "--pipeline"))), None)
    if command_at is not None and args[command_at] in VM_COMMANDS:
        from cloudbake.run import commands

        pipeline, _ = split_pipeline_option(args[:command_at])
        if pipeline is not None:
            context.set_default_pipeline(pipeline)
        return commands.main(args[command_at:], pipeline, lambda task: doit([task]))
    pipeline, doit_argv = split_pipeline_option(args)
    if pipeline is not None:
        context.set_default_pipeline(pipeline)
    return doit(doit_argv)


if __name__ == "__main__":
    sys.exit(main())
