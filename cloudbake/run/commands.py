"""The ``cloudbake`` commands that are not doit tasks: they return an exit status of their own.

    cloudbake test-image [--cmd CMD] [-j N] [--keep]   the command's own exit status
    cloudbake up [--json]                              start a VM and say how to reach it
    cloudbake ssh [RUN] [COMMAND...]                   a shell (or a command) in a VM that is up
    cloudbake ps [--json]                              the VMs that are up
    cloudbake down [RUN... | --all]                    stop VMs, delete their overlays and keys

``test-image`` bakes first when the image is missing or stale (doit's ``bake`` task), then
runs the tests; doit's own ``test-image`` task fails with "exit status N" instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths, resolve_paths
from cloudbake.config.pipeline import load_images, select_image
from cloudbake.core.errors import Interrupted, MachineryError, PipelineError, stop_signals_unwind
from cloudbake.core.log import redact, stage_logger
from cloudbake.run.machine import Machine
from cloudbake.run.runs import RunInfo, list_runs, stop_run
from cloudbake.run.ssh import ssh_argv
from cloudbake.run.testrun import EXIT_MACHINERY, run_test_image

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = stage_logger("cloudbake")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudbake", description="Throwaway VMs of the baked image.")
    sub = parser.add_subparsers(dest="command", required=True)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--image", help="the image, in a pipeline file that describes several (matrix:, images:)")
    test = sub.add_parser("test-image", parents=[which],
                          help="run the tests in throwaway VMs; exits with the command's status")
    test.add_argument("--cmd", help="command to run instead of test.command")
    test.add_argument("-j", "--jobs", type=int, help="VMs at once (test.parallel)")
    test.add_argument("--keep", action="store_true", help="keep the VM running afterwards (cloudbake down ends it)")
    test.add_argument("--no-bake", action="store_true", help="do not bake first; fail when no image is baked")
    up = sub.add_parser("up", parents=[which], help="start a throwaway VM and print how to reach it")
    up.add_argument("--json", action="store_true", help="print the VM as JSON")
    ssh = sub.add_parser("ssh", parents=[which], help="a shell, or a command, in a VM that is up")
    ssh.add_argument("run", nargs="?", help="the run id (cloudbake ps); optional when one VM is up")
    ssh.add_argument("remote", nargs=argparse.REMAINDER, help="command to run instead of a shell")
    ps = sub.add_parser("ps", parents=[which], help="the VMs that are up")
    ps.add_argument("--json", action="store_true")
    down = sub.add_parser("down", parents=[which], help="stop VMs and delete their overlays and keys")
    down.add_argument("runs", nargs="*", help="run ids (cloudbake ps)")
    down.add_argument("--all", action="store_true", help="every VM of this pipeline")
    return parser


def main(argv: list[str], pipeline_file: str | None, bake: Callable[[str], int]) -> int:
    """Run one of cloudbake's own commands (``cli.VM_COMMANDS``); ``bake(task)`` runs doit's bake task
    (``bake`` or ``bake:<image>``) and returns its status."""
    args = _parser().parse_args(argv)
    try:
        with stop_signals_unwind():
            file = Path(pipeline_file or "pipeline.yaml")
            images = load_images(file)
            # ssh, ps and down work on the output folder, which every image of a file shares.
            shared = args.command in ("ssh", "ps", "down") and args.image is None
            pipeline = images[0] if shared else select_image(images, args.image, file)
            paths = resolve_paths(pipeline)
            if args.command == "test-image":
                task = f"bake:{pipeline.name}" if len(images) > 1 else "bake"
                return _test_image(pipeline, paths, args, lambda: bake(task))
            if args.command == "up":
                return _up(pipeline, paths, args.json)
            if args.command == "ssh":
                return _ssh(paths, args.run, args.remote)
            if args.command == "ps":
                return _ps(paths, args.json)
            return _down(paths, args.runs, args.all)
    except MachineryError as err:
        print(f"cloudbake: {redact(str(err))}", file=sys.stderr)
        return EXIT_MACHINERY
    except PipelineError as err:  # the command line or the pipeline is wrong
        print(f"cloudbake: {redact(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        what = err.signal_name if isinstance(err, Interrupted) else "Ctrl-C"
        print(f"cloudbake: interrupted ({what}); the VMs and their files were cleaned up", file=sys.stderr)
        return EXIT_INTERRUPTED


def _test_image(pipeline: Pipeline, paths: Paths, args: argparse.Namespace, bake: Callable[[], int]) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise PipelineError("-j needs a number of VMs, 1 or more")
    if not args.no_bake:
        status = bake()
        if status != 0:
            raise MachineryError("bake", f"baking the image failed (doit exit status {status}); see above")
    outcome = run_test_image(pipeline, paths, args.cmd, args.keep, args.jobs)
    outcome.log_verdict()
    return outcome.exit_status


def _up(pipeline: Pipeline, paths: Paths, as_json: bool) -> int:
    machine = Machine(pipeline, paths, label="up")
    machine.start()
    machine.detach()
    machine.close()
    info = next((r for r in list_runs(paths.output_dir) if r.files.id == machine.id), None)
    if info is None:
        raise MachineryError("up", "the VM stopped right after it started", hint="cloudbake ps; then try again")
    if as_json:
        print(json.dumps(_as_dict(info), indent=2))
    else:
        print(f"VM {info.files.id} is up (base {info.base})\n"
              f"  ssh:   cloudbake ssh {info.files.id}\n"
              f"  or:    {shlex.join(ssh_argv(info.files, info.ssh_port or 0, info.user))}\n"
              + "".join(f"  port:  guest {guest} on 127.0.0.1:{host}\n" for guest, host in info.forwards.items())
              + f"  stop:  cloudbake down {info.files.id}")
    return 0


def _as_dict(info: RunInfo) -> dict[str, object]:
    return {"id": info.files.id, "state": info.state, "base": info.base, "user": info.user,
            "ssh_port": info.ssh_port, "ports": {str(g): h for g, h in info.forwards.items()},
            "age_s": round(info.age_s), "qemu_pid": info.qemu_pid,
            "ssh": ssh_argv(info.files, info.ssh_port or 0, info.user), "serial_log": str(info.files.serial_log)}


def _up_runs(paths: Paths) -> list[RunInfo]:
    return [r for r in list_runs(paths.output_dir) if r.state != "leftover"]


def _ssh(paths: Paths, run_id: str | None, remote: list[str]) -> int:
    runs = _up_runs(paths)
    if run_id is None:
        if len(runs) != 1:
            raise PipelineError(f"{len(runs)} VMs are up: name one" if runs else "no VM is up",
                                hint="cloudbake ps lists them; cloudbake up starts one")
        chosen = runs[0]
    else:
        found = [r for r in runs if r.files.id == run_id]
        if not found:
            raise PipelineError(f"no VM {run_id!r} is up", hint="cloudbake ps lists them")
        chosen = found[0]
    remote = remote[1:] if remote[:1] == ["--"] else remote
    # Joined with spaces, as ssh itself does: `cloudbake ssh ID make check` and
    # `cloudbake ssh ID "a && b"` both mean what they would with ssh.
    command = " ".join(remote) if remote else None
    argv = ssh_argv(chosen.files, chosen.ssh_port or 0, chosen.user, command, tty=command is None and
                    sys.stdin.isatty())
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 0  # not reached


def _ps(paths: Paths, as_json: bool) -> int:
    runs = _up_runs(paths)
    if as_json:
        print(json.dumps([_as_dict(r) for r in runs], indent=2))
        return 0
    if not runs:
        print("no VMs are up")
        return 0
    print(f"{'RUN':<32} {'STATE':<8} {'SSH':<16} {'AGE':>6}  {'PORTS':<20} BASE")
    for r in runs:
        ports = ",".join(f"{g}->{h}" for g, h in r.forwards.items()) or "-"
        print(f"{r.files.id:<32} {r.state:<8} 127.0.0.1:{r.ssh_port or 0:<6} {_age(r.age_s):>6}  {ports:<20} "
              f"{r.base}")
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _down(paths: Paths, run_ids: list[str], every: bool) -> int:
    runs = list_runs(paths.output_dir)
    if every:
        chosen = runs
    elif run_ids:
        known = {r.files.id: r for r in runs}
        missing = [i for i in run_ids if i not in known]
        if missing:
            raise PipelineError(f"no VM {', '.join(missing)}", hint="cloudbake ps lists them")
        chosen = [known[i] for i in run_ids]
    else:
        raise PipelineError("say which VMs to stop", hint="cloudbake down RUN..., or cloudbake down --all")
    started = time.monotonic()
    for r in chosen:
        stop_run(r.files)
        print(f"stopped {r.files.id}")
    if chosen:
        log.info("stopped %d VM(s) in %.1f s", len(chosen), time.monotonic() - started)
    return 0
