"""Reaching a test VM over SSH: free ports on 127.0.0.1, the OpenSSH argv with the host key pinned,
and ``GuestShell``, which runs commands there in ``test.workdir`` with ``test.env`` and tells a
command's own exit status 255 from a broken connection.
"""

from __future__ import annotations

import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.runner import CommandTimeoutError, guest_path, run, spawn, tail
from cloudbake.qemu.vmrun import VmRun
from cloudbake.run.runs import RunFiles
from cloudbake.run.transfer import host_key_changed

# Guest-side files of cloudbake's own: the command's environment and its recorded exit status.
GUEST_STATE = "~/.cloudbake"



# --- SSH ----------------------------------------------------------------------------------


def ssh_argv(files: RunFiles, port: int, user: str, command: str | None = None, *, connect_timeout: int = 10,
             tty: bool = False, identity: Path | None = None) -> list[str]:
    """OpenSSH with the host key pinned: no trust on first use, no agent, no user config.

    ``identity`` is the client key (default: the run's own). The keyword options are OpenSSH's,
    each with the value a test run wants.
    """
    argv = ["ssh", "-F", "none"]
    argv += ["-i", str(identity or files.client_key)]
    argv += ["-p", str(port)]
    argv += ["-o", "IdentitiesOnly=yes"]
    argv += ["-o", "IdentityAgent=none"]
    argv += ["-o", "BatchMode=yes"]
    argv += ["-o", "StrictHostKeyChecking=yes"]
    argv += ["-o", f"UserKnownHostsFile={files.known_hosts}"]
    argv += ["-o", "GlobalKnownHostsFile=/dev/null"]
    argv += ["-o", "HostKeyAlgorithms=ssh-ed25519"]
    argv += ["-o", f"ConnectTimeout={connect_timeout}"]
    argv += ["-o", "ServerAliveInterval=15"]
    argv += ["-o", "ServerAliveCountMax=8"]
    argv += ["-o", "LogLevel=ERROR"]
    argv += ["-t" if tty else "-T"]
    argv += [f"{user}@127.0.0.1"]
    if command is not None:
        argv += ["--", command]
    return argv


def ssh_banner(port: int, timeout: float = 3.0) -> bool:
    """True when an SSH server answers: QEMU's user networking accepts connections before sshd is up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


remote_path = guest_path   # the one home of the rule is core.runner


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())



def wait_for(vm: VmRun, deadline: Deadline, stage: str, check: Callable[[], bool], poll_s: float = 1.0) -> None:
    """Poll ``check()`` until it is true; fail naming the stage when the guest exits or time runs out."""
    step = stage.split(":")[0]
    while True:
        if vm.proc is not None and vm.proc.poll() is not None:
            err = vm.failure(f"the guest stopped (QEMU exit {vm.proc.returncode}) while waiting for: {stage}")
            raise MachineryError.from_error(step, err)
        if check():
            return
        if deadline.left() <= 0:
            err = vm.failure(f"'{stage.split(': ', 1)[-1]}' did not happen within test.timeout "
                             f"({deadline.total:.0f} s)",
                             hint=f"raise test.timeout, or look at the serial log: {vm.spec.serial_log}")
            raise MachineryError.from_error(step, err)
        time.sleep(poll_s)


# --- commands in the guest ----------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """What a command in the guest did. ``stdout``/``stderr`` are empty when the output was streamed."""

    status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0


class CommandFailedError(PipelineError):
    """``vm.run(..., check=True)`` saw a non-zero exit status."""

    def __init__(self, command: str, result: CommandResult) -> None:
        super().__init__(f"the command failed with exit status {result.status}: {command}\n{tail(result.stderr)}")
        self.result = result



class GuestShell:
    """Commands in one test VM as the run user, in ``workdir`` with the environment file sourced."""

    def __init__(self, files: RunFiles, port: int, user: str, workdir: str, output_prefix: str | None) -> None:
        self.files, self.port, self.user, self.workdir = files, port, user, workdir
        self.output_prefix = output_prefix   # ``[run N]``: output streamed line by line with it
        self._status_nonce = secrets.token_hex(4)

    def argv(self, command: str | None = None, *, tty: bool = False, connect_timeout: int = 10) -> list[str]:
        return ssh_argv(self.files, self.port, self.user, command, tty=tty, connect_timeout=connect_timeout)

    def ok(self, command: str, timeout: float) -> bool:
        """``command`` exits 0 (a readiness probe); a changed host key is an error, never a retry."""
        try:
            result = run(self.argv(command, connect_timeout=5), stage="test-image", timeout=timeout, check=False)
        except CommandTimeoutError:
            return False
        if result.returncode == 255 and "Host key verification failed" in result.stderr:
            raise host_key_changed()
        return result.returncode == 0

    def run(self, command: str, *, limit: float, env: dict[str, str] | None = None,
            capture: bool = True) -> CommandResult:
        """Run ``command``; its status and output (streamed instead when not ``capture``d and prefixed).

        Only the machinery raises: no SSH (MachineryError ``ssh``), no answer within ``limit``
        (MachineryError ``timeout``).
        """
        if env:
            self.write_env(env, name=f"env.{self._status_nonce}", limit=limit)
        script = self._command_script(command, extra_env=bool(env))
        try:
            if capture or self.output_prefix is None:
                result = run(self.argv(script), stage="test-image", timeout=limit, check=False, capture=capture)
                status, stdout, stderr = result.returncode, result.stdout, result.stderr
            else:
                status, stdout, stderr = self._run_prefixed(script, limit), "", ""
        except CommandTimeoutError:
            raise MachineryError("timeout", f"the command did not finish within {limit:.0f} s: {command}",
                                 hint="raise test.timeout (or the timeout you passed)") from None
        if status == 255:
            status = self._status_after_disconnect(stderr)
        return CommandResult(status, stdout, stderr)

    def prepare(self, env: dict[str, str], limit: float) -> None:
        """The working folder (owned by the run user) and the command's environment file, in one trip."""
        workdir = remote_path(self.workdir)
        make = (f"{{ mkdir -p {workdir} 2>/dev/null || sudo -n install -d -o \"$(id -un)\" -g \"$(id -gn)\" "
                f"{workdir}; }} && test -w {workdir} || {{ echo 'cannot create {self.workdir}' >&2; "
                "exit 3; }; ")
        self.write_env(env, name="env", limit=limit, before=make)

    def write_env(self, env: dict[str, str], name: str, limit: float, before: str = "") -> None:
        """A shell file of exports, readable by the run user only: values never appear on a command line."""
        text = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))
        write = (f"{before}umask 077 && mkdir -p {remote_path(GUEST_STATE)} && "
                 f"cat > {remote_path(GUEST_STATE + '/' + name)}")
        result = run(self.argv(write), stage="test-image", timeout=max(5.0, limit), check=False, input=text.encode())
        if result.returncode == 3 and before:
            raise MachineryError("workdir", f"cannot create test.workdir {self.workdir} in the guest:\n"
                                            f"{tail(result.stderr)}")
        if result.returncode != 0:
            raise MachineryError("env", f"cannot write the command's environment in the guest:\n{tail(result.stderr)}")

    def _command_script(self, command: str, *, extra_env: bool) -> str:
        """The user's command in a subshell, so its own ``exit`` still records the status."""
        state = remote_path(GUEST_STATE)
        sources = f". {state}/env" + (f" && . {state}/env.{self._status_nonce}" if extra_env else "")
        # CLOUDBAKE_WORKDIR is the folder's absolute path as the guest resolves it (test.workdir may say ~/src).
        return (f"cd {remote_path(self.workdir)} && {sources} && export CLOUDBAKE_WORKDIR=\"$PWD\" || exit 255\n"
                f"(\n{command}\n)\n"
                f"s=$?; printf %s \"$s\" > {state}/status.{self._status_nonce}; exit \"$s\"")

    def _status_after_disconnect(self, stderr: str) -> int:
        """SSH exits 255 for its own failures and for a command that exited 255: the recorded status decides."""
        if "Host key verification failed" in stderr:
            raise host_key_changed()
        state = remote_path(GUEST_STATE)
        try:
            result = run(self.argv(f"cat {state}/status.{self._status_nonce}"), stage="test-image", timeout=30,
                         check=False)
        except CommandTimeoutError:
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip().isdigit():
            return int(result.stdout.strip())
        raise MachineryError("ssh", f"the SSH connection to the guest broke while the command ran:\n{tail(stderr)}",
                             hint=f"the guest may have crashed or powered off; serial log: {self.files.serial_log}")

    def _run_prefixed(self, script: str, timeout: float) -> int:
        """Stream the command's output line by line, each line prefixed (``-j``: many runs share a terminal)."""
        with spawn(self.argv(script), stage="test-image", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE) as spawned:
            proc = spawned.proc
            pumps = [threading.Thread(target=_pump, args=(stream, out, self.output_prefix), daemon=True)
                     for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
            for pump in pumps:
                pump.start()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise CommandTimeoutError("timed out") from None
            for pump in pumps:
                pump.join(10)
            return proc.returncode


def _pump(stream: IO[bytes] | None, out: Any, prefix: str | None) -> None:
    assert stream is not None
    for line in iter(stream.readline, b""):
        out.write(f"{prefix} {line.decode(errors='replace').rstrip(chr(10))}\n")
        out.flush()
