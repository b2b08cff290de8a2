"""test-image: the project's code into throwaway VMs of the baked image, its command run there,
its results out; one VM or many at once.

Exit statuses (docs/testing-your-project.md): the command's own status; EXIT_TIMEOUT when
it outran test.timeout; EXIT_MACHINERY when cloudbake's side failed (no base image, boot,
SSH, upload, artifacts), with the stage named. Of many runs, the worst.
"""

from __future__ import annotations

import concurrent.futures
import shlex
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.exits import Exit
from cloudbake.core.log import stage_logger
from cloudbake.core.tools import check_host_tools, run_tools
from cloudbake.core.units import human_bytes
from cloudbake.image.store import Manifest
from cloudbake.qemu.host import available_memory
from cloudbake.run.junit import JunitSummary, publish_summary, summarize_junit
from cloudbake.run.machine import Machine
from cloudbake.run.runs import clean_leftovers, current_base
from cloudbake.run.warm import WarmSet

log = stage_logger("test-image")

# timeout(1)'s status for "it ran out of time", and docker run's for "the tool failed, not the command".
EXIT_TIMEOUT = Exit.timeout
EXIT_MACHINERY = Exit.machinery
# What one QEMU needs on top of the guest's RAM (its own code, TCG's translation cache, I/O buffers).
QEMU_OVERHEAD_BYTES = 512 << 20


# --- runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    index: int
    exit_status: int
    artifacts: list[str]
    artifacts_dir: Path
    junit: JunitSummary | None
    error: str | None          # the machinery's message when it failed
    stage: str | None          # the machinery's stage that failed


@dataclass(frozen=True)
class Outcome:
    runs: list[RunResult]

    @property
    def exit_status(self) -> int:
        """The worst run: the machinery failing, then a timeout, then the first failing command."""
        statuses = [r.exit_status for r in self.runs]
        for worst in (EXIT_MACHINERY, EXIT_TIMEOUT):
            if worst in statuses and any(r.stage for r in self.runs if r.exit_status == worst):
                return worst
        return next((s for s in statuses if s != 0), 0)

    def log_verdict(self) -> None:
        """The outcome in the log: that the command passed, or one line per failed run saying what failed."""
        several = len(self.runs) > 1
        if self.exit_status == 0:
            log.info("the test command passed" + (f" in all {len(self.runs)} runs" if several else ""))
            return
        for result in self.runs:
            if result.exit_status != 0:
                what = (f"cloudbake's machinery failed at stage {result.stage}" if result.stage
                        else "the test command failed")
                log.error("%s%s (exit status %d)", f"run {result.index}: " if several else "", what,
                          result.exit_status)


def run_plan(pipeline: Pipeline, jobs: int | None) -> tuple[int, int, bool]:
    """(runs, at once, sharded): test.shards runs when set, else one run per parallel VM."""
    parallel = jobs or pipeline.test.parallel
    if pipeline.test.shards:
        return pipeline.test.shards, min(parallel, pipeline.test.shards), True
    return parallel, parallel, False


def check_memory(pipeline: Pipeline, at_once: int) -> None:
    """Refuse to start N VMs that will not fit in the host's memory, before starting any."""
    needed = at_once * (pipeline.vm.memory_bytes + QEMU_OVERHEAD_BYTES)
    available = available_memory()
    if available is not None and needed > available:
        fits = max(1, available // (pipeline.vm.memory_bytes + QEMU_OVERHEAD_BYTES))
        raise MachineryError("memory", f"{at_once} VMs at once need about {human_bytes(needed)} "
                                       f"({at_once} x vm.memory {human_bytes(pipeline.vm.memory_bytes)} + "
                                       f"QEMU's own), but this host has {human_bytes(available)} available",
                             hint=f"run at most -j {fits}, or lower vm.memory")


class Keep(StrEnum):
    """Which VMs of a test run stay up afterwards, for a look (``cloudbake ssh``, ``cloudbake down``)."""

    never = "never"
    always = "always"           # --keep: one run only
    on_failure = "on-failure"   # --keep-failed: every run whose command or machinery failed


@dataclass(frozen=True)
class TestRequest:
    """What a test-image command asks for, the same value from doit's params, the CLI and the API."""

    __test__ = False   # not a pytest test class, despite its name

    command: str | None = None      # None: test.command
    jobs: int | None = None         # None: test.parallel
    keep: Keep = Keep.never
    timeout_s: float | None = None  # None: test.timeout


@dataclass(frozen=True)
class TestRuns:
    """One test-image command, resolved once and handed to every run: the image's base looked up once."""

    pipeline: Pipeline
    paths: Paths
    base: tuple[Path, Manifest]   # the published image and its manifest, checked
    command: str
    runs: int
    sharded: bool
    timeout_s: float | None
    keep: Keep


def run_test_image(pipeline: Pipeline, paths: Paths, request: TestRequest = TestRequest()) -> Outcome:
    """Run the test command in fresh VMs of the baked image: upload, command, artifacts, summary."""
    runs, at_once, sharded = run_plan(pipeline, request.jobs)
    if request.keep is Keep.always and runs > 1:
        raise PipelineError("--keep keeps one VM; it cannot be combined with several runs",
                            hint="drop -j/test.shards, use --keep-failed, or cloudbake up for VMs to keep")
    check_host_tools(run_tools(warm=pipeline.test.warm, git=pipeline.test.upload == "git"), stage="host")
    check_memory(pipeline, at_once)
    try:
        base = current_base(pipeline, paths)
    except PipelineError as err:
        raise MachineryError.from_error("base image", err) from None
    clean_leftovers(base[0])
    plan = TestRuns(pipeline, paths, base, request.command or pipeline.test.command, runs, sharded,
                    request.timeout_s, request.keep)
    if runs == 1:
        return Outcome([_one_run(plan, 0, None)])
    log.info("%d runs of %s, %d at a time%s", runs, base[0].name, at_once, " (sharded)" if sharded else "")
    machines: list[Machine] = []
    lock = threading.Lock()

    def one(index: int) -> RunResult:
        return _one_run(plan, index, (machines, lock))

    with concurrent.futures.ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = [pool.submit(one, index) for index in range(runs)]
        try:
            results = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            with lock:
                for machine in machines:
                    machine.abort()
            raise
    return Outcome(results)


def _one_run(plan: TestRuns, index: int,
             registry: tuple[list[Machine], threading.Lock] | None) -> RunResult:
    """Run ``index`` of the plan; ``registry`` collects the machines of parallel runs (Ctrl-C stops them all)."""
    pipeline, runs = plan.pipeline, plan.runs
    prefix = f"[run {index}]" if runs > 1 else None
    env = {"CLOUDBAKE_RUN": str(index)}
    if plan.sharded:
        env |= {"CLOUDBAKE_SHARD": str(index), "CLOUDBAKE_SHARDS": str(runs)}
    machine = Machine(pipeline, plan.paths, label="test-image", timeout_s=plan.timeout_s, env=env,
                      output_prefix=prefix)
    if registry is not None:
        with registry[1]:
            registry[0].append(machine)
    artifacts_dir = plan.paths.work_dir / "artifacts"
    try:
        with machine.start(plan.base):
            artifacts_dir = artifacts_dir / machine.id
            try:
                machine.upload_project()
                machine.say("running: %s", plan.command)
                status = machine.run(plan.command, capture=False).status
                artifacts = machine.fetch_artifacts(pipeline.test.artifacts, artifacts_dir)
                if artifacts:
                    machine.say("copied %d artifact(s) into %s", len(artifacts), artifacts_dir)
            except MachineryError:
                _keep_if(plan.keep is not Keep.never, machine)
                raise
            _keep_if(plan.keep is Keep.always or (plan.keep is Keep.on_failure and status != 0), machine)
    except MachineryError as err:
        log.error("%s%s", f"{prefix} " if prefix else "", err)
        status = EXIT_TIMEOUT if err.stage == "timeout" else EXIT_MACHINERY
        return RunResult(index, status, [], artifacts_dir, None, str(err), err.stage)
    junit = summarize_junit([artifacts_dir / name for name in artifacts])
    if junit is not None:
        publish_summary(junit, f"run {index}" if runs > 1 else "test-image")
    return RunResult(index, status, artifacts, artifacts_dir, junit, None, None)


def _keep_if(keep: bool, machine: Machine) -> None:
    """Leave the VM running (a kept run) and say how to reach it; a VM that stopped is not kept."""
    if not keep or machine.files is None or machine.vm is None or machine.vm.proc is None \
            or machine.vm.proc.poll() is not None:
        return
    machine.detach()
    machine.say("the VM keeps running (run %s).\n  ssh: %s\n  or:  cloudbake ssh %s\n  serial log: %s\n"
                "  stop it: cloudbake down %s", machine.id, shlex.join(machine.ssh_argv()), machine.id,
                machine.serial_log, machine.id)


def run_test_task(pipeline: Pipeline, paths: Paths, request: TestRequest) -> None:
    """doit's test-image: the task fails with the exit status (cloudbake test-image exits with it)."""
    outcome = run_test_image(pipeline, paths, request)
    outcome.log_verdict()
    status = outcome.exit_status
    if status == 0:
        return
    failed = [r for r in outcome.runs if r.exit_status != 0]
    if any(r.stage for r in failed):
        stages = ", ".join(sorted({r.stage for r in failed if r.stage}))
        raise PipelineError(f"cloudbake's machinery failed (stage: {stages}); exit status {status}",
                            hint="the message above says what failed; the VM was thrown away")
    which = f" in run(s) {', '.join(str(r.index) for r in failed)}" if len(outcome.runs) > 1 else ""
    raise PipelineError(f"the test command failed with exit status {status}{which}",
                        hint="its output is above; the VM was thrown away (--keep keeps it for a look)")


def run_warm(pipeline: Pipeline, paths: Paths) -> WarmSet | None:
    """``doit warm``: save the warm state of the baked image for this host, unless it is saved already;
    the set, or None when warm start is off or saving failed (said in one line: test runs boot cold).

    The task pushes the set beside the image with ``cache.push`` (or ``CLOUDBAKE_PUSH=1``), so a
    fleet that bakes once resumes warm everywhere.
    """
    from cloudbake.run.machine import ensure_warm_set

    if not pipeline.test.warm:
        log.info("test.warm is false: no warm state to save")
        return None
    try:
        warm = ensure_warm_set(pipeline, paths)
    except MachineryError as err:
        # Warm start is an optimization: a CI job goes on to save its image and test (cold).
        log.warning("could not save a warm state (%s); test runs boot cold", err.message)
        return None
    if warm is None:
        return None
    record = warm.record()
    log.info("warm set %s: state %s (saved in %.1f s)", warm.folder.name, human_bytes(int(record["state_bytes"])),
             float(record.get("save_s", 0)))
    return warm


def warm_is_current(pipeline: Pipeline, paths: Paths) -> bool:
    """Nothing to do for ``doit warm``: the set is saved, or warm start is off, or there is no image yet
    (then the bake comes first and the action runs)."""
    from cloudbake.run.warmstart import current_warm_set

    if not pipeline.test.warm:
        return True
    try:
        return current_warm_set(pipeline, paths) is not None
    except PipelineError:
        return False


def run_console(pipeline: Pipeline, paths: Paths) -> None:
    """An interactive throwaway VM: serial console on this terminal (Ctrl-A X quits), deleted afterwards.

    Resumed from the image's warm set like a test run (``test.warm: false`` boots it instead);
    the console shows the guest from the moment it resumes or boots, and the SSH command for
    another terminal is printed once the run's key works.
    """
    machine = Machine(pipeline, paths, label="console", prepare_guest=False, interactive=True)
    with machine:
        assert machine.vm is not None and machine.files is not None
        log.info("console VM%s; from another terminal: %s\n  Ctrl-A X quits; the VM is thrown away",
                 " (resumed warm)" if machine.warm_set is not None else "", shlex.join(machine.ssh_argv()))
        machine.vm.wait(float("inf"), poll_s=0.5)
