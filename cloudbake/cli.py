"""The ``cloudbake`` command: every verb, tasks and VMs alike, with doit as its engine.

    cloudbake bake                        bake ./pipeline.yaml's image (nothing runs when it is baked)
    cloudbake test-image -p ci.yaml       run the tests in throwaway VMs; exits with the command's status
    cloudbake up / ssh / ps / down        throwaway VMs for people and harnesses
    cloudbake doit list --deps            doit's own commands on cloudbake's tasks

doit is underneath, the way Nikola wraps it: the task verbs run through ``DoitMain`` with a loader
that hands doit the definitions of ``cloudbake.tasks`` (this repository's tasks/ folder, mapped
into the wheel), so ``doit bake`` in this repository and ``cloudbake bake`` anywhere run the same
task. The front door is cloudbake's own: its help, its options on either side of the verb, one
exit status per kind of failure (``cloudbake.core.exits``), JSON on stdout and the log on stderr.

Describing the command (``--help``, ``VERB --help``) loads no pipeline and imports no VM code.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from types import ModuleType
from typing import Any, NoReturn

from cloudbake.core.exits import Exit

TASK_MODULES = ("fetch", "seed", "bake", "testrun", "inspect", "registry")
# cloudbake's own commands (cloudbake.run.commands): they return an exit status of their own.
VM_VERBS = {
    "test-image": "Run test.command (or --cmd) in throwaway VMs of the baked image, baking first when needed; "
                  "exits with the command's status",
    "up": "Start a throwaway VM of the baked image and print how to reach it",
    "ssh": "A shell in a VM that is up, or a command after -- (the only VM when one is up)",
    "ps": "The VMs that are up",
    "down": "Stop a VM (the only one, by id or unique prefix, or --all) and delete its overlay and keys",
}
GROUPS = (
    ("bake an image", ("fetch", "update", "seed", "bake", "cache-key", "status", "validate")),
    ("run VMs of it", ("test-image", "up", "ssh", "ps", "down", "console", "warm")),
    ("share and tidy", ("push", "pull", "prune", "prune-downloads")),
)
MORE = {
    "doit": "doit's own commands on cloudbake's tasks: list, info, clean, forget, dumpdb ...",
    "help": "This help, or one verb's (cloudbake help VERB)",
}
# doit's own commands answer under their names too (``cloudbake list --deps``), without being the face of the tool.
DOIT_COMMANDS = ("list", "info", "clean", "forget", "ignore", "dumpdb", "strace", "reset-dep", "run", "auto",
                 "tabcompletion")
EXIT_TABLE = ("exit status: 0 ok; 1 a task failed; 2 usage or pipeline error; test-image: the test command's own "
              "status, 124 it timed out, 125 cloudbake's machinery failed; 130 interrupted")
USAGE = "usage: cloudbake [-p FILE] [--image NAME] VERB [options]   (cloudbake help: every verb)"


def task_definitions() -> tuple[ModuleType, list[ModuleType]]:
    """The context module and the task modules: ``cloudbake.tasks`` when installed, else a checkout's tasks/."""
    context = importlib.import_module(f"{_tasks_package()}.context")
    return context, [importlib.import_module(f"{_tasks_package()}.{name}") for name in TASK_MODULES]


def _definitions_for(pipeline: str | None) -> tuple[ModuleType, list[ModuleType]]:
    """``task_definitions()`` with the command's pipeline file (``-p``) as the tasks' default."""
    context, modules = task_definitions()
    if pipeline is not None:
        context.set_default_pipeline(pipeline)
    return context, modules


def _tasks_package() -> str:
    try:
        importlib.import_module("cloudbake.tasks")
    except ModuleNotFoundError:
        return "tasks"  # a checkout run without installing (PYTHONPATH=.)
    return "cloudbake.tasks"


def summaries() -> dict[str, str]:
    """One line per verb, task verbs from the tasks' own table."""
    tasks: dict[str, str] = importlib.import_module(f"{_tasks_package()}.verbs").SUMMARIES
    return {**tasks, **VM_VERBS, **MORE}


def version_line() -> str:
    from importlib import metadata

    import cloudbake

    try:
        doit_version = metadata.version("doit")
    except metadata.PackageNotFoundError:
        doit_version = "?"
    return f"cloudbake {cloudbake.__version__} (doit {doit_version}, Python {sys.version.split()[0]})"


def help_text() -> str:
    lines = [USAGE, "", "Bake clean, tested VM images from Ubuntu, Debian and Fedora cloud images, and run tests "
             "in throwaway VMs of them.", ""]
    known = summaries()
    for title, verbs in (*GROUPS, ("more", tuple(MORE))):
        lines.append(f"{title}:")
        lines += [f"  {verb:<17}{known[verb]}" for verb in verbs]
        lines.append("")
    lines += ["options (before or after the verb):",
              "  -p, --pipeline FILE  the pipeline file (default ./pipeline.yaml)",
              "  --image NAME         one image of a file that describes several (matrix:, images:)",
              "  --version            cloudbake's version", "  -h, --help           this help; VERB --help: one verb's",
              "", EXIT_TABLE]
    return "\n".join(lines) + "\n"


def _common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given before the verb is not overwritten by the verb parser's default.
    parser.add_argument("-p", "--pipeline", metavar="FILE", default=argparse.SUPPRESS,
                        help="the pipeline file (default ./pipeline.yaml)")
    parser.add_argument("--image", metavar="NAME", default=argparse.SUPPRESS,
                        help="one image of a file that describes several (matrix:, images:)")


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """The options of one verb; pure, so ``cloudbake VERB --help`` needs no pipeline."""
    usage = "cloudbake ssh [ID] [-- COMMAND ...]" if verb == "ssh" else None
    parser = argparse.ArgumentParser(prog=f"cloudbake {verb}", usage=usage, description=summaries()[verb],
                                     epilog=EXIT_TABLE)
    _common_options(parser)
    add = parser.add_argument
    if verb == "bake":
        add("--force", action="store_true", help="bake again even when the image for the current key is published")
    elif verb == "update":
        add("--downgrade", action="store_true", help="accept an older signed upstream image")
    elif verb in ("status", "cache-key", "ps"):
        add("--json", action="store_true", help="print one JSON document on stdout (the log goes to stderr)")
    elif verb == "test-image":
        add("--cmd", help="command to run instead of test.command")
        add("-j", "--jobs", type=int, help="VMs at once (test.parallel)")
        keep = parser.add_mutually_exclusive_group()
        keep.add_argument("--keep", action="store_true", help="keep the VM running afterwards (cloudbake down ends it)")
        keep.add_argument("--keep-failed", action="store_true",
                          help="keep the VM of a failed run (with -j too) and say how to reach it")
        add("--no-bake", action="store_true", help="do not bake first; fail when no image is baked")
    elif verb == "up":
        add("--json", action="store_true", help="print the VM as one JSON document on stdout")
        add("--name", help="the VM's id (letters, digits, -, _), instead of a generated one")
    elif verb == "ssh":
        add("run", nargs="?", metavar="ID", help="the VM's id or a unique prefix (cloudbake ps); optional when one "
                                                "VM is up")
    elif verb == "down":
        add("runs", nargs="*", metavar="ID", help="VM ids or unique prefixes (cloudbake ps); optional when one VM "
                                                 "is up")
        add("--all", action="store_true", help="every VM of this pipeline")
    return parser


def _verb_at(args: list[str]) -> int | None:
    """Where the verb is: the first word that is neither an option nor a global option's value."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-p", "--pipeline", "--image"):
            index += 2
            continue
        if not arg.startswith("-"):
            return index
        index += 1
    return None


class _FrontParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Exit.usage, f"cloudbake: {message} (doit's own options go after `cloudbake doit`)\n")


def _global_parser() -> argparse.ArgumentParser:
    parser = _FrontParser(prog="cloudbake", usage=USAGE.removeprefix("usage: "), add_help=False)
    parser.add_argument("-p", "--pipeline", metavar="FILE")
    parser.add_argument("--image", metavar="NAME")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--version", action="store_true")
    return parser


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def main(argv: list[str] | None = None) -> int:
    """The ``cloudbake`` command; returns its exit status (``cloudbake.core.exits``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _main(args)
        sys.stdout.flush()
    except BrokenPipeError:   # stdout's reader went away (`cloudbake status | head -1`): end quietly
        from cloudbake.core.files import silence_stdout

        silence_stdout()
        return Exit.output_closed
    return status


def _main(args: list[str]) -> int:
    at = _verb_at(args)
    try:
        front = _global_parser().parse_args(args[:at] if at is not None else args)
    except SystemExit as stop:   # argparse said what was wrong
        return int(stop.code or 0)
    if front.version:
        print(version_line())
        return Exit.ok
    if at is None or front.help:
        print(help_text(), end="", file=sys.stdout if front.help else sys.stderr)
        return Exit.ok if front.help else Exit.usage
    verb, rest = args[at], args[at + 1:]
    known = summaries()
    if verb == "help":
        if rest and rest[0] not in known:
            print(f"cloudbake: no verb {rest[0]!r}{did_you_mean(rest[0], list(known))}\n{USAGE}", file=sys.stderr)
            return Exit.usage
        print(verb_parser(rest[0]).format_help() if rest and rest[0] not in MORE else help_text(), end="")
        return Exit.ok
    if verb == "doit" or verb in DOIT_COMMANDS:
        return _doit_passthrough(front.pipeline, rest if verb == "doit" else [verb, *rest])
    if verb not in known:
        print(f"cloudbake: no verb {verb!r}{did_you_mean(verb, list(known))}\n{USAGE}", file=sys.stderr)
        return Exit.usage
    remote: list[str] = []
    if verb == "ssh" and "--" in rest:
        split = rest.index("--")
        rest, remote = rest[:split], rest[split + 1:]
    parser = verb_parser(verb)
    if verb == "ssh":
        parser.add_argument("remote", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    try:
        options = parser.parse_args(rest)
    except SystemExit as stop:
        return int(stop.code or 0)
    options.pipeline = getattr(options, "pipeline", None) or front.pipeline
    options.image = getattr(options, "image", None) or front.image
    if verb == "ssh":
        options.remote = remote or options.remote
    images = _load_images(options.pipeline)
    if isinstance(images, int):
        return images
    if verb in VM_VERBS:
        from cloudbake.run import commands

        # The pipeline values the tasks see, so the bake before a test run and the run share one resolution.
        pipelines = tuple(image.pipeline for image in images)
        return commands.main(verb, options, pipelines, lambda task: _run_tasks(options.pipeline, [task]))
    return _task_verb(verb, options, images)


def _load_images(pipeline: str | None) -> Any:
    """The images of the pipeline file, loaded once for the command (the tasks' own cache), or the usage
    status after saying what is wrong with the file."""
    from doit.exceptions import InvalidDodoFile

    from cloudbake.core.errors import PipelineError

    context, _ = _definitions_for(pipeline)
    try:
        return context.current_images()
    except (PipelineError, InvalidDodoFile) as err:
        return _usage_error(str(err))


def _task_verb(verb: str, options: argparse.Namespace, images: Any) -> int:
    """A task verb: its task (``bake``, or ``bake:<image>`` with --image), run by doit; --json by the engine."""
    from cloudbake.config.pipeline import select_image
    from cloudbake.core.errors import PipelineError

    if options.image is not None:
        try:
            select_image(tuple(image.pipeline for image in images), options.image,
                         options.pipeline or "pipeline.yaml")
        except PipelineError as err:
            return _usage_error(str(err))
    if getattr(options, "json", False):
        return _json_verb(verb, [image for image in images
                                 if options.image is None or image.pipeline.name == options.image])
    task = verb if options.image is None or not images[0].several else f"{verb}:{options.image}"
    argv = [task]
    if getattr(options, "force", False):
        argv.append("--force")
    if getattr(options, "downgrade", False):
        argv.append("downgrade=1")
    return _run_tasks(options.pipeline, argv)


def _usage_error(message: str) -> int:
    from cloudbake.core.log import redact

    print(f"cloudbake: {redact(message)}", file=sys.stderr)
    return Exit.usage


def _json_verb(verb: str, images: list[Any]) -> int:
    """``status --json`` and ``cache-key --json``: one document, an object for one image, ``{"images": [...]}``
    for several."""
    import json

    from cloudbake.core.errors import PipelineError

    def one(image: Any) -> dict[str, Any]:
        if verb == "status":
            from cloudbake.image.inspect import collect_status

            status: dict[str, Any] = collect_status(image.pipeline, image.paths)
            return status
        from cloudbake.image.build import resolve_key

        return {"image": image.pipeline.name, "key": resolve_key(image.pipeline, image.paths)[0]}

    try:
        documents = [one(image) for image in images]
    except PipelineError as err:
        print(f"cloudbake: {verb}: {err}", file=sys.stderr)
        return Exit.failed
    print(json.dumps(documents[0] if len(documents) == 1 else {"images": documents}, indent=2, sort_keys=True))
    return Exit.ok


def _doit_passthrough(pipeline: str | None, rest: list[str]) -> int:
    """``cloudbake doit ARGS``: doit's own command line on cloudbake's tasks, statuses as doit gives them."""
    from cloudbake.core.errors import PipelineError

    context, modules = _definitions_for(pipeline)
    try:
        return _doit(context, modules, _cmd_as_variable(rest), front_door=False)
    except PipelineError as err:
        return _usage_error(str(err))


def _cmd_as_variable(argv: list[str]) -> list[str]:
    """doit reads every argument holding '=' as a variable, option values too, so a command like
    ``dd if=/dev/zero`` would never reach --cmd: hand it over as ``cmd=...``."""
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--cmd" and index + 1 < len(argv):
            rest.append(f"cmd={argv[index + 1]}")
            index += 1
        elif arg.startswith("--cmd="):
            rest.append("cmd=" + arg.removeprefix("--cmd="))
        else:
            rest.append(arg)
        index += 1
    return rest


def _run_tasks(pipeline: str | None, argv: list[str]) -> int:
    """Run doit tasks (``["bake"]``, ``["bake:noble", "--force"]``) and return cloudbake's exit status for them."""
    context, modules = _definitions_for(pipeline)
    return _doit(context, modules, argv, front_door=True)


def _doit(context: ModuleType, modules: list[ModuleType], argv: list[str], *, front_door: bool) -> int:
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    doitutil = importlib.import_module(f"{context.__package__}.doitutil")

    class Loader(ModuleTaskLoader):  # type: ignore[misc]
        """doit's module loader, with DOIT_CONFIG computed when doit asks for it (after the pipeline is known)."""

        def load_doit_config(self) -> dict[str, Any]:
            config: dict[str, Any] = context.doit_config()
            if front_door:   # task titles and failures on stderr: stdout is what the tasks print
                config = {**config, "reporter": doitutil.StderrReporter}
            return config

    namespace = {name: getattr(module, name) for module in modules for name in dir(module)
                 if name.startswith("task_")}
    doitutil.failure_status.clear()
    status: int = DoitMain(Loader(namespace)).run(argv)
    if not front_door or status == 0:
        return status
    if status == 3:   # doit's "invalid command or dodo file": here, the pipeline or a variable
        return Exit.usage
    return doitutil.failure_status[-1] if doitutil.failure_status else Exit.failed


if __name__ == "__main__":
    sys.exit(main())
