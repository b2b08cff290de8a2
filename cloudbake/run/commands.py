"""The ``cloudbake`` verbs that are not doit tasks: they return an exit status of their own.

    cloudbake test-image [--cmd CMD] [-j N] [--keep | --keep-failed]   the command's own exit status
    cloudbake up [--name NAME] [--json]       start a VM and say how to reach it
    cloudbake ssh [ID] [-- COMMAND ...]       a shell (or a command) in a VM that is up
    cloudbake ps [--json]                     the VMs that are up
    cloudbake down [ID ... | --all]           stop VMs, delete their overlays and keys

Their options are parsed by the front door (``cloudbake.cli``); an ID is a VM's id or a unique
prefix of it, and may be left out when exactly one VM is up. ``test-image`` bakes first when the
image is missing or stale (the ``bake`` task), then runs the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths, resolve_paths
from cloudbake.config.pipeline import select_image
from cloudbake.core.errors import Interrupted, MachineryError, PipelineError, stop_signals_unwind
from cloudbake.core.exits import Exit
from cloudbake.core.log import redact, stage_logger
from cloudbake.core.tools import check_host_tools, run_tools
from cloudbake.run.machine import Machine
from cloudbake.run.runs import RunInfo, list_runs, stop_run
from cloudbake.run.ssh import ssh_argv
from cloudbake.run.testrun import Keep, TestRequest, run_test_image


def main(verb: str, args: argparse.Namespace, images: tuple[Pipeline, ...], bake: Callable[[str], int]) -> int:
    """Run one of cloudbake's own verbs (``cli.VM_VERBS``) with the options the front door parsed, on the
    ``images`` of the pipeline file it loaded; ``bake(task)`` runs the bake task (``bake`` or
    ``bake:<image>``) and returns its exit status."""
    log = stage_logger(verb)
    try:
        with stop_signals_unwind():
            file = Path(args.pipeline or "pipeline.yaml")
            # ssh, ps and down work on the output folder, which every image of a file shares.
            shared = verb in ("ssh", "ps", "down") and args.image is None
            pipeline = images[0] if shared else select_image(images, args.image, file)
            paths = resolve_paths(pipeline)
            if verb == "test-image":
                task = f"bake:{pipeline.name}" if len(images) > 1 else "bake"
                return _test_image(pipeline, paths, args, lambda: bake(task))
            if verb == "up":
                return _up(pipeline, paths, args.json, args.name)
            if verb == "ssh":
                return _ssh(paths, args.run, args.remote)
            if verb == "ps":
                return _ps(paths, args.json)
            return _down(paths, args.runs, args.all, log)
    except MachineryError as err:
        print(f"cloudbake: {redact(str(err))}", file=sys.stderr)
        return Exit.machinery
    except PipelineError as err:  # the command line or the pipeline is wrong
        print(f"cloudbake: {redact(str(err))}", file=sys.stderr)
        return Exit.usage
    except KeyboardInterrupt as err:
        what = err.signal_name if isinstance(err, Interrupted) else "Ctrl-C"
        print(f"cloudbake: interrupted ({what}); the VMs and their files were cleaned up", file=sys.stderr)
        return Exit.interrupted


def _test_image(pipeline: Pipeline, paths: Paths, args: argparse.Namespace, bake: Callable[[], int]) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise PipelineError("-j needs a number of VMs, 1 or more")
    keep = Keep.always if args.keep else Keep.on_failure if args.keep_failed else Keep.never
    request = TestRequest(args.cmd, args.jobs, keep)
    # Before a bake that may take minutes.
    check_host_tools(run_tools(warm=pipeline.test.warm, git=pipeline.test.upload == "git"), stage="host")
    if not args.no_bake:
        status = bake()
        if status == Exit.interrupted:
            raise KeyboardInterrupt
        if status != 0:
            raise MachineryError("bake", f"baking the image failed (exit status {status}); see above")
    outcome = run_test_image(pipeline, paths, request)
    outcome.log_verdict()
    return outcome.exit_status


def _up(pipeline: Pipeline, paths: Paths, as_json: bool, name: str | None) -> int:
    machine = Machine(pipeline, paths, label="up", name=name)
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


def pick_runs(runs: list[RunInfo], wanted: list[str]) -> list[RunInfo]:
    """The runs ``wanted`` names, each by its id or a unique prefix (as docker's ids); with none
    named, the only run. Anything ambiguous or unknown is an error that lists what is up."""
    known = ", ".join(r.files.id for r in runs) or "none"
    if not wanted:
        if len(runs) == 1:
            return runs
        raise PipelineError(f"{len(runs)} VMs are up ({known}): name one" if runs else "no VM is up",
                            hint="cloudbake ps lists them; cloudbake up starts one")
    chosen = []
    for name in wanted:
        exact = [r for r in runs if r.files.id == name]
        matches = exact or [r for r in runs if r.files.id.startswith(name)]
        if len(matches) != 1:
            what = "no VM" if not matches else f"{len(matches)} VMs match"
            raise PipelineError(f"{what} {name!r} (up: {known})", hint="cloudbake ps lists them")
        chosen.append(matches[0])
    return chosen


def _ssh(paths: Paths, run_id: str | None, remote: list[str]) -> int:
    check_host_tools(["ssh"], stage="host")
    chosen = pick_runs(_up_runs(paths), [run_id] if run_id else [])[0]
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


def _down(paths: Paths, run_ids: list[str], every: bool, log: logging.Logger) -> int:
    runs = list_runs(paths.output_dir)
    chosen = runs if every else pick_runs(runs, run_ids)
    started = time.monotonic()
    for r in chosen:
        stop_run(r.files)
        print(f"stopped {r.files.id}")
    if chosen:
        log.info("stopped %d VM(s) in %.1f s", len(chosen), time.monotonic() - started)
    return 0
