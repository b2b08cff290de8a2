"""A throwaway VM of the baked image, ready over SSH: the one implementation behind
``test-image``, ``up``, the Python API and the pytest plugin.

``Machine`` holds the lifecycle of one VM (start, run, put, get, close) and delegates: the run
folder to ``runs``, commands to ``ssh.GuestShell``, files to ``guestfiles``, warm start to
``warmstart``. Whatever ends a VM's block, its QEMU is stopped and its folder (private key
included) removed, unless it was detached on purpose (``up``, ``--keep``).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cloudbake.config.model import Forward, Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.progress import waiting
from cloudbake.core.runner import stop_process
from cloudbake.core.tools import check_host_tools, run_tools
from cloudbake.image.store import Manifest
from cloudbake.qemu.vmrun import VmRun, console_line
from cloudbake.run import guestfiles, warmstart
from cloudbake.run.runs import (
    RunFiles,
    RunPlan,
    boot_on_free_ports,
    clean_leftovers,
    current_base,
    new_run,
    prepare_run,
)
from cloudbake.run.ssh import CommandFailedError, CommandResult, Deadline, GuestShell, ssh_banner, wait_for
from cloudbake.run.warm import WarmSet

log = stage_logger("warm")   # the module's own lines are about warm sets; a VM logs under its label

__all__ = ["CommandFailedError", "CommandResult", "Machine", "ensure_warm_set"]


class Machine:
    """A throwaway VM of the pipeline's baked image, booted and ready over SSH.

    ``start()`` (or entering the block) boots an overlay, waits until the run user logs in
    with this run's key and cloud-init is done, and creates ``test.workdir``. Commands run
    there with ``test.env`` set. ``close()`` (or leaving the block) powers the guest off and
    deletes the run folder; ``detach()`` leaves it running for ``ps``/``ssh``/``down``.

    Failures of the machinery raise MachineryError naming the stage; a command's own
    status is returned, never raised, unless ``check=True``.
    """

    def __init__(self, pipeline: Pipeline, paths: Paths, *, label: str = "vm", timeout_s: float | None = None,
                 env: dict[str, str] | None = None, output_prefix: str | None = None,
                 timeout_per_step: bool = False, warm: bool | None = None, prepare_guest: bool = True,
                 key_channel: bool = False, interactive: bool = False, name: str | None = None) -> None:
        """Keyword options, each with the default a test run wants. ``timeout_s`` (default
        test.timeout) bounds the whole life of the VM, boot included, as test-image wants; with
        ``timeout_per_step`` it bounds the boot and each step on its own (a session-long VM of the
        API or the pytest plugin). ``warm`` (default test.warm) resumes from the image's warm set;
        ``prepare_guest=False`` leaves the working folder and the environment file out (the VM
        that a warm set is saved from must not carry them, and has the ``key_channel``);
        ``interactive`` puts the serial console on this terminal (doit console); ``name``: the run's id
        (``cloudbake up --name``), else a short random one."""
        self.pipeline, self.paths, self.label = pipeline, paths, label
        self.log = stage_logger(label)   # each verb's VM logs under its name: [up], [test-image], [pytest-gw0]
        self.user = pipeline.cloud_init.user
        self.timeout_s = timeout_s or pipeline.test.timeout_s
        self.timeout_per_step = timeout_per_step
        self.warm = pipeline.test.warm if warm is None else warm
        self.prepare_guest, self.key_channel, self.interactive = prepare_guest, key_channel, interactive
        self.deadline = Deadline(self.timeout_s)
        self.extra_env = dict(env or {})
        self.output_prefix = output_prefix
        self.name = name
        self.files: RunFiles | None = None
        self.vm: VmRun | None = None
        self.shell: GuestShell | None = None
        self.forwards: tuple[Forward, ...] = ()
        self.base: Path | None = None
        self.manifest: Manifest | None = None
        self.ssh_port = 0
        self.detached = False
        self.warm_set: WarmSet | None = None     # the set this VM resumed from, when it started warm
        self._stack = contextlib.ExitStack()
        self._ready = False

    def __enter__(self) -> Machine:
        return self if self.files is not None else self.start()   # ``with machine.start(base):`` too

    def __exit__(self, *exc: Any) -> None:
        self.close(*exc)

    def start(self, base: tuple[Path, Manifest] | None = None) -> Machine:
        """Boot (or resume) and wait until ready; ``base``: the published image, when the caller looked it up."""
        check_host_tools(run_tools(warm=self.warm), stage="host")
        try:
            self.base, self.manifest = base or current_base(self.pipeline, self.paths)
        except PipelineError as err:
            raise MachineryError.from_error("base image", err) from None
        clean_leftovers(self.base)
        self.files = new_run(self.base, self.name)
        plan = RunPlan(self.pipeline, self.paths, self.base, self.manifest, self.files, self.label)
        try:
            save = functools.partial(save_warm_set, self.pipeline, self.paths, self.base, self.manifest)
            warm = warmstart.choose_warm_set(self.pipeline, self.paths, self.base, self.manifest,
                                             save) if self.warm else None
            if warm is None or not self._start_warm(plan, warm):
                self._start_cold(plan)
            if self.prepare_guest:
                self._prepare_guest()
            self._ready = True
        except BaseException:
            self.close(*sys.exc_info())
            raise
        return self

    def _start_cold(self, plan: RunPlan) -> None:
        """Boot the overlay with this run's seed; ready once the run user logs in and cloud-init is done."""
        host_public = prepare_run(plan)
        self._boot(plan)
        assert self.shell is not None
        plan.files.known_hosts.write_text(f"[127.0.0.1]:{self.ssh_port} {host_public}\n")
        self._record_vm()
        self.say("VM of %s booting (run %s, SSH on 127.0.0.1:%d%s)", plan.base.name, plan.files.id, self.ssh_port,
                 self._forwards_text())
        self._wait("boot: SSH port answers", lambda: ssh_banner(self.ssh_port))
        self._wait("ssh: login with the run's key", lambda: self.shell is not None and self.shell.ok("true", 30))
        self._wait("cloud-init: finished (cloud-init status --wait)",
                   lambda: self.shell is not None and self.shell.ok(
                       "cloud-init status --wait >/dev/null; test $? -ne 1", max(5.0, self.deadline.left())))

    def _start_warm(self, plan: RunPlan, warm: WarmSet) -> bool:
        """Resume from ``warm``; False when that fails (then the run boots cold)."""
        started = time.monotonic()
        resumed = warmstart.resume(plan, warm, interactive=self.interactive)
        if resumed is None:
            return False
        self.vm, self.forwards, self.ssh_port = resumed.vm, resumed.forwards, resumed.port
        self.shell = GuestShell(plan.files, resumed.port, self.user, self.pipeline.test.workdir, self.output_prefix)
        try:
            self._wait("ssh: login with the run's key", lambda: self.shell is not None and self.shell.ok("true", 30))
        except PipelineError as err:
            resumed.stack.close()
            self.vm, self.shell, self.ssh_port = None, None, 0
            warmstart.give_up(plan, warm, err)
            return False
        self._stack.enter_context(resumed.stack)
        self.warm_set = warm
        self._record_vm()
        self.say("VM of %s resumed warm in %.1f s (state loaded in %.1f s; run %s, SSH on 127.0.0.1:%d%s)",
                 plan.base.name, time.monotonic() - started, resumed.load_s, plan.files.id, resumed.port,
                 self._forwards_text())
        return True

    def _record_vm(self) -> None:
        assert self.files is not None and self.vm is not None
        self.files.record_vm(self.vm, self.ssh_port, self.forwards)

    def _forwards_text(self) -> str:
        return "".join(f", guest port {f.guest} on 127.0.0.1:{f.host}" for f in self.forwards)

    def close(self, *exc: Any) -> None:
        """Stop the VM and delete the run folder; a detached VM is left as it is.

        QEMU quits at once (QMP ``quit``) instead of the guest shutting down: its disk is a
        throwaway overlay and the artifacts are already out, so a clean shutdown would only
        cost seconds. ``exc`` is what ends the block (``__exit__``'s arguments).
        """
        exc_info = (*exc, None, None, None)[:3]
        if self.detached:
            self._stack.close()
            return
        try:
            if self.vm is not None and self.vm.proc is not None and self.vm.proc.poll() is None:
                self.vm.quit_now()
        finally:
            self._stack.__exit__(*exc_info)
            if self.files is not None:
                shutil.rmtree(self.files.folder, ignore_errors=True)

    def abort(self) -> None:
        """Stop QEMU now (another thread's VM was interrupted); the owner's ``close`` then cleans up."""
        if self.vm is not None and self.vm.proc is not None:
            stop_process(self.vm.proc, 2)

    def detach(self) -> None:
        """Leave the VM running after this process: ``cloudbake ps`` lists it, ``cloudbake down`` ends it."""
        assert self.vm is not None and self.files is not None
        self.vm.keep_running()
        self.detached = True
        self.files.update_record(kept=True)

    # -- reaching it --

    @property
    def id(self) -> str:
        assert self.files is not None
        return self.files.id

    @property
    def serial_log(self) -> Path:
        """The guest's serial console so far (gone with the run folder after ``close``)."""
        assert self.files is not None
        return self.files.serial_log

    def port(self, guest: int) -> int:
        """The host port on 127.0.0.1 that reaches ``guest`` (22, or one of ``test.forward``)."""
        if guest == 22:
            return self.ssh_port
        for forward in self.forwards:
            if forward.guest == guest:
                return forward.host
        raise PipelineError(f"guest port {guest} is not forwarded", hint="add it to test.forward")

    def ssh_argv(self, command: str | None = None, *, tty: bool = False) -> list[str]:
        """OpenSSH argv reaching this VM as the run user (host key pinned); ``command`` runs it there."""
        assert self.shell is not None
        return self.shell.argv(command, tty=tty)

    # -- commands and files --

    def run(self, command: str, *, check: bool = False, timeout: float | None = None,
            env: dict[str, str] | None = None, capture: bool = True) -> CommandResult:
        """Run ``command`` with the run user's shell in ``test.workdir``, ``test.env`` and ``env`` set.

        Returns its status and output (``capture=False`` streams the output instead, prefixed
        with ``[run N]`` when the VM has an output prefix). ``check=True`` raises
        CommandFailedError on a non-zero status. Only the machinery raises otherwise: no
        SSH (MachineryError ``ssh``), no answer within ``timeout`` (MachineryError ``timeout``).
        """
        assert self.shell is not None
        limit = timeout if timeout is not None else self._time_left()
        result = self.shell.run(command, limit=limit, env=env, capture=capture)
        if check and not result.ok:
            raise CommandFailedError(command, result)
        return result

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a host file or folder into the guest (``~`` is the run user's home).

        A folder's contents go into the folder ``remote`` (created, merged with what is there);
        a file becomes ``remote``, or goes inside it when ``remote`` is a folder.
        """
        guestfiles.put_path(self.ssh_argv, local, remote, self._time_left())

    def get(self, remote: str, local: Path | str, *, max_bytes: int | None = None) -> Path:
        """Copy a guest file or folder to ``local`` on the host (read with sudo, extracted safely)."""
        return guestfiles.get_path(self.ssh_argv, remote, local, timeout_s=self._time_left(),
                                   max_bytes=max_bytes or self.pipeline.test.artifacts_max_bytes)

    def fetch_artifacts(self, patterns: Sequence[str], dest: Path) -> list[str]:
        """Copy guest paths/globs into ``dest`` through one tar stream, bounded by test.artifacts_max."""
        with waiting(self.log, "artifacts: copying them out of the VM"):
            return guestfiles.fetch_artifacts(self.ssh_argv, patterns, dest, timeout_s=self._time_left(),
                                              max_bytes=self.pipeline.test.artifacts_max_bytes)

    def upload_project(self) -> None:
        """Send what test.upload selects (by default the git work tree) into test.workdir."""
        from cloudbake.run.upload import upload_project

        upload_project(self.pipeline, self.upload_tree, self.say)

    def upload_tree(self, root: Path, names: Sequence[str]) -> None:
        """Stream ``names`` (relative to ``root``) into ``test.workdir`` as one tar, owned by the run user."""
        assert self.files is not None
        with waiting(self.log, f"upload: {len(names)} paths into {self.pipeline.test.workdir}"):
            guestfiles.upload_tree(self.ssh_argv, root, names, workdir=self.pipeline.test.workdir,
                                   listing=self.files.folder / "upload.list", timeout_s=self._time_left())

    # -- inside --

    def _time_left(self, at_least: float = 1.0) -> float:
        """What a step may take: the rest of the run's time, or (per step, once ready) test.timeout."""
        if self.timeout_per_step and self._ready:
            return self.timeout_s
        return max(at_least, self.deadline.left())

    def say(self, message: str, *args: Any) -> None:
        """A log line of this VM, prefixed with its run index when several run at once."""
        self.log.info((f"{self.output_prefix} " if self.output_prefix else "") + message, *args)

    def _wait(self, stage: str, check: Callable[[], bool]) -> None:
        vm = self.vm
        assert vm is not None
        with waiting(self.log, stage, lambda: f"console: {console_line(vm.spec.serial_log)}"):
            wait_for(vm, self.deadline, stage, check)

    def _prepare_guest(self) -> None:
        """The working folder (owned by the run user) and the command's environment file, in one trip."""
        assert self.shell is not None
        env = {**dict(self.pipeline.test.env),
               **{f"CLOUDBAKE_PORT_{f.guest}": str(f.host) for f in self.forwards},
               **self.extra_env}
        self.shell.prepare(env, self._time_left(5.0))

    def _boot(self, plan: RunPlan) -> None:
        booted = boot_on_free_ports(plan, key_channel=self.key_channel, interactive=self.interactive)
        self._stack.enter_context(booted.stack)   # so ``close`` stops it whatever happens
        self.vm, self.ssh_port, self.forwards = booted.vm, booted.port, booted.forwards
        self.shell = GuestShell(plan.files, booted.port, self.user, self.pipeline.test.workdir, self.output_prefix)


def save_warm_set(pipeline: Pipeline, paths: Paths, base: Path, manifest: Manifest, version: str) -> WarmSet:
    """Boot ``base`` once with the key port and save a warm set from it (``warmstart.choose_warm_set``)."""
    log.info("no warm state of %s for this QEMU setup yet: booting it once to save one", base.name)
    builder = Machine(pipeline, paths, label="warm", warm=False, prepare_guest=False, key_channel=True)
    builder.start((base, manifest))
    try:
        assert builder.vm is not None and builder.files is not None
        plan = RunPlan(pipeline, paths, base, manifest, builder.files, "warm")
        return warmstart.save_warm_set(plan, builder.vm, builder.ssh_argv, version)
    finally:
        builder.close()


def ensure_warm_set(pipeline: Pipeline, paths: Paths) -> WarmSet | None:
    """The warm set of the published image for this host: found, or made now (one boot and a save).

    What ``doit warm`` runs after the bake, so a CI cache saved after it carries the set and the
    first test run of every fresh runner resumes warm. None when saving is not possible here
    (said in one warning line; test runs then boot cold).
    """
    try:
        base, manifest = current_base(pipeline, paths)
    except PipelineError as err:
        raise MachineryError.from_error("base image", err) from None
    return warmstart.choose_warm_set(pipeline, paths, base, manifest,
                                     functools.partial(save_warm_set, pipeline, paths, base, manifest))
