"""A running VM: started from a spec, watched with a timeout and a heartbeat, stopped whatever
ends it; and the fallback to TCG when KVM cannot run it.

Shared by the bake and by test-image, so both boot the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.progress import plain_text, waiting
from cloudbake.core.runner import Spawned, spawn, stop_process, tail
from cloudbake.qemu.argv import VmSpec, build_qemu_argv
from cloudbake.qemu.host import AccelChoice, kvm_failure_verdict, kvm_verdict_file, qemu_binary, remember_kvm_broken

# sockaddr_un.sun_path holds 108 bytes including the final NUL; QEMU refuses longer socket paths.
UNIX_SOCKET_PATH_MAX = 107


SERIAL_TAIL_LINES = 30


# Without a byte on the serial console this long after start, a KVM guest counts as hung.
KVM_PROGRESS_TIMEOUT_S = 45.0


class KvmNoProgressError(Exception):
    """The guest printed nothing under KVM in time: this host's KVM does not run guests."""


# How often the bake asks QEMU whether the guest powered off (QEMU itself stays up with -no-shutdown).
POWER_OFF_POLL_S = 2.0


@dataclass(frozen=True)
class VmExit:
    seconds: float
    returncode: int
    powered_off: bool = False   # the guest shut down and QEMU stayed up (vm.qemu_args: -no-shutdown)


def guest_shut_down(qmp_socket: Path) -> bool:
    """True when QEMU reports the guest shut down (``query-status``: ``shutdown``); False if unsure."""
    try:
        status = qmp_command(qmp_socket, "query-status", timeout=2.0)
    except Exception:   # the monitor is not up yet, or busy: ask again at the next poll
        return False
    return isinstance(status, dict) and status.get("status") == "shutdown"


def serial_tail(log_file: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    try:
        text = log_file.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return "(no serial output)"
    text = text.replace("\r", "")
    return tail(text, lines) or "(no serial output)"


def console_line(log_file: Path) -> str:
    """The console's last line as plain text (no colours or cursor moves), at most 120 characters."""
    return plain_text(serial_tail(log_file, 1)).strip()[-120:]


def qmp_command(socket_path: Path, command: str, timeout: float = 5.0, args: dict[str, Any] | None = None) -> Any:
    """One QMP command over the VM's monitor socket (qemu.qmp's client); returns its result.

    ``timeout`` bounds the whole exchange, connecting and negotiating included (the legacy
    synchronous client has no timeout on connect: a wedged monitor would hang the caller).
    An error answer, no answer in time or no monitor raises PipelineError.
    """
    import asyncio
    import logging

    from qemu.qmp import ExecuteError, QMPClient
    from qemu.qmp.protocol import ConnectError

    # qemu.qmp logs every refused connection at ERROR; a monitor that is not up yet is expected here.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

    async def exchange() -> Any:
        client = QMPClient("cloudbake")
        try:
            await client.connect(str(socket_path))
            return await client.execute(command, args or None)
        finally:
            await client.disconnect()

    try:
        return asyncio.run(asyncio.wait_for(exchange(), timeout))
    except ExecuteError as err:
        raise PipelineError(f"QMP {command}: {err.error.error.desc}") from None
    except TimeoutError:
        raise PipelineError(f"QMP {command}: no answer from {socket_path} within {timeout:g} s") from None
    except (ConnectError, OSError, EOFError) as err:
        raise PipelineError(f"QMP {command}: cannot reach {socket_path} ({type(err).__name__})") from None


def graceful_stop(proc: subprocess.Popen[bytes], qmp_socket: Path, grace_s: float, log_stage: str) -> None:
    """ACPI power button through QMP, ``grace_s`` to shut down, then terminate and kill."""
    if proc.poll() is not None:
        return
    try:
        qmp_command(qmp_socket, "system_powerdown")
    except Exception:  # no monitor to ask: waiting would only delay the kill
        stop_process(proc)
        return
    stage_logger(log_stage).info("asked the guest to power down (ACPI); waiting up to %.0f s", grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    stop_process(proc)


class VmRun:
    """A VM started from a spec; ``wait`` polls it with a watchdog.

    Used as a context manager: whatever ends the block (success, error, timeout,
    Ctrl-C), QEMU is stopped and reaped, so no QEMU process survives a step.
    """

    def __init__(self, spec: VmSpec, binary: str, stage: str) -> None:
        self.spec, self.binary, self.stage = spec, binary, stage
        self.log = stage_logger(stage)
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned: Spawned | None = None
        self.started = 0.0
        self._stack = contextlib.ExitStack()
        self._socket_dir: Path | None = None
        self._stderr_file = spec.serial_log.with_name(spec.serial_log.stem + ".qemu-stderr.log")

    def __enter__(self) -> VmRun:
        sockets = [self.spec.qmp_socket, *([self.spec.key_channel] if self.spec.key_channel else [])]
        if any(len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX for path in sockets):
            # Deep work folders overflow the socket path limit: use a private folder under the temp dir.
            import dataclasses
            import tempfile

            self._socket_dir = Path(tempfile.mkdtemp(prefix="cloudbake-"))
            self.spec = dataclasses.replace(
                self.spec, qmp_socket=self._socket_dir / "qmp.sock",
                key_channel=self._socket_dir / "key.sock" if self.spec.key_channel else None)
        self.spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
        # A new file, not a truncated one: a QEMU left over from an earlier boot keeps writing
        # into the old (unlinked) file and can never put its lines into this boot's log.
        self.spec.serial_log.unlink(missing_ok=True)
        self.spec.serial_log.write_bytes(b"")
        self.spec.qmp_socket.unlink(missing_ok=True)
        if self.spec.key_channel is not None:
            self.spec.key_channel.unlink(missing_ok=True)
        argv = build_qemu_argv(self.spec, self.binary)
        self.log.info("starting %s (accel %s, %d vCPU, %d MiB)", os.path.basename(self.binary), self.spec.accel,
                      self.spec.cpus, self.spec.memory_mib)
        self._stderr_file.unlink(missing_ok=True)
        stderr = self._stack.enter_context(open(self._stderr_file, "wb"))
        interactive = self.spec.interactive
        self.spawned = self._stack.enter_context(
            spawn(argv, stage=self.stage, stdout=None if interactive else subprocess.DEVNULL, stderr=stderr,
                  stdin=None if interactive else subprocess.DEVNULL, grace=5.0, new_session=not interactive))
        self.proc = self.spawned.proc
        self.started = time.monotonic()
        return self

    def keep_running(self) -> None:
        """The VM outlives this block (test-image keep=1)."""
        if self.spawned is not None:
            self.spawned.keep_running()

    @property
    def kept(self) -> bool:
        return self.spawned is not None and self.spawned.kept

    def __exit__(self, *exc: object) -> None:
        if self.kept:
            self._stack.close()
            return
        try:
            if self.proc is not None and self.proc.poll() is None:
                if isinstance(exc[0], type) and issubclass(exc[0], KeyboardInterrupt):
                    self.quit_now()
                else:
                    graceful_stop(self.proc, self.spec.qmp_socket, 10.0, self.stage)
        finally:
            self._stack.close()
            self.spec.qmp_socket.unlink(missing_ok=True)
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def keep_for_inspection(self) -> str:
        """Leave QEMU running after the block (the guest failed under -no-shutdown); returns how to reach it."""
        assert self.proc is not None
        self.keep_running()
        return (f"QEMU (pid {self.proc.pid}) is kept running for inspection because vm.qemu_args has "
                f"-no-shutdown: its monitor is the QMP socket {self.spec.qmp_socket} (for example "
                f"`socat - UNIX-CONNECT:{self.spec.qmp_socket}`, then {{\"execute\": \"qmp_capabilities\"}}); "
                f"stop it with `kill {self.proc.pid}`")

    def quit_now(self) -> None:
        """No shutdown: QMP quit, then terminate and kill (an interrupt, or a throwaway VM that is done)."""
        assert self.proc is not None
        with contextlib.suppress(Exception):
            qmp_command(self.spec.qmp_socket, "quit", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3.0)
        stop_process(self.proc)

    def qemu_stderr(self) -> str:
        with contextlib.suppress(OSError):
            return tail(self._stderr_file.read_text(errors="replace"), 10)
        return ""

    def failure(self, message: str, hint: str | None = None) -> PipelineError:
        detail = f"{message}\n--- last lines of {self.spec.serial_log} ---\n{serial_tail(self.spec.serial_log)}"
        stderr = self.qemu_stderr()
        if stderr:
            detail += f"\n--- QEMU said ---\n{stderr}"
        return PipelineError(detail, hint=hint or f"the whole serial log is in {self.spec.serial_log}")

    def wait(self, timeout_s: float, *, progress_timeout_s: float | None = None,
             until: Callable[[], bool] | None = None, poll_s: float = 0.5,
             watch_power_off: bool = False) -> VmExit:
        """Until QEMU exits (or ``until()`` is true). Raises on timeout, or KvmNoProgressError when
        ``progress_timeout_s`` passes with no serial output at all.

        ``watch_power_off``: also end when the guest has shut down but QEMU stays up (``-no-shutdown``,
        a debugging recipe), asked over QMP; the returned VmExit says ``powered_off``.
        """
        assert self.proc is not None
        # A TCG boot takes minutes: say every so often what the guest is doing.
        with waiting(self.log, "the guest to finish", lambda: f"console: {self._last_serial_line()}"):
            return self._wait(timeout_s, progress_timeout_s, until, poll_s, watch_power_off)

    def _wait(self, timeout_s: float, progress_timeout_s: float | None, until: Callable[[], bool] | None,
              poll_s: float, watch_power_off: bool) -> VmExit:
        assert self.proc is not None
        streamed = 0
        called = time.monotonic()
        next_power_check = called + POWER_OFF_POLL_S
        while True:
            code = self.proc.poll()
            elapsed = time.monotonic() - self.started
            waited = time.monotonic() - called
            streamed = self._stream_serial(streamed)
            if code is not None:
                return VmExit(elapsed, code)
            if watch_power_off and time.monotonic() >= next_power_check:
                next_power_check = time.monotonic() + POWER_OFF_POLL_S
                if guest_shut_down(self.spec.qmp_socket):
                    return VmExit(elapsed, 0, powered_off=True)
            if until is not None and until():
                return VmExit(elapsed, -1)
            if progress_timeout_s is not None and elapsed > progress_timeout_s and self.serial_size() == 0:
                raise KvmNoProgressError()
            if waited > timeout_s:
                raise self.failure(f"the guest did not finish within {timeout_s:.0f} s; it was stopped",
                                   hint=f"raise vm.timeout if it was still working; serial log: "
                                        f"{self.spec.serial_log}")
            time.sleep(poll_s)

    def _last_serial_line(self) -> str:
        return console_line(self.spec.serial_log)

    def serial_size(self) -> int:
        try:
            return self.spec.serial_log.stat().st_size
        except OSError:
            return 0

    def _stream_serial(self, offset: int) -> int:
        """At debug verbosity (CLOUDBAKE_VERBOSE=1), the serial console streams into the log live."""
        if not self.log.isEnabledFor(10):
            return offset
        try:
            with open(self.spec.serial_log, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return offset
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode(errors="replace").splitlines():
            self.log.debug("serial: %s", line.rstrip("\r"))
        return offset + end


@contextlib.contextmanager
def boot_with_fallback(spec: VmSpec, choice: AccelChoice, cache_dir: Path, stage: str,
                       progress_timeout_s: float = KVM_PROGRESS_TIMEOUT_S) -> Iterator[tuple[VmRun, AccelChoice]]:
    """Start the VM; when auto picked KVM, watch it first and fall back to TCG if KVM cannot run it.

    Hosts differ in how a broken KVM shows: on some the guest hangs without a byte on the
    console, on others QEMU aborts at once (``failed to set MSR``, an assertion in kvm.c),
    refuses ``-cpu host`` or cannot create the VM. Both end in TCG, with the verdict
    remembered in QEMU's own words. QEMU exiting for other reasons (a missing disk, a bad
    argument) is not a KVM verdict: the caller reports it as it is.

    Yields the running VM and the accelerator finally used. The caller ``wait``s on it.
    """

    binary = qemu_binary(spec.arch)
    log = stage_logger(stage)
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    if choice.probe:
        verdict: str | None = None
        vm = VmRun(spec, binary, stage)
        with vm:
            try:
                exit_ = vm.wait(progress_timeout_s, progress_timeout_s=progress_timeout_s,
                                until=lambda: vm.serial_size() > 0)
            except KvmNoProgressError:
                verdict = f"no output from the guest under KVM within {progress_timeout_s:.0f} s"
                if vm.proc is not None:
                    stop_process(vm.proc)
            else:
                if exit_.returncode != -1 and vm.serial_size() == 0:
                    verdict = kvm_failure_verdict(exit_.returncode, vm.qemu_stderr())
                if verdict is None:
                    yield vm, choice
                    return
        log.warning("KVM cannot run guests on this host (%s); falling back to TCG, remembered in %s",
                    verdict, kvm_verdict_file(cache_dir))
        remember_kvm_broken(cache_dir, verdict)
        choice = AccelChoice("tcg", f"KVM cannot run guests here ({verdict}): software emulation (TCG)")
        spec = dataclasses.replace(spec, accel="tcg")
    vm = VmRun(spec, binary, stage)
    with vm:
        yield vm, choice
