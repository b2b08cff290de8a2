"""test-image: a throwaway qcow2 overlay of the baked image, booted headless, driven over SSH.

Every run has its own folder, overlay, SSH key pair, pinned host key, seed and port,
so runs can go side by side; the base image is only ever read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.build import resolve_key
from cloudbake.errors import PipelineError
from cloudbake.files import write_atomically
from cloudbake.firmware import with_uefi
from cloudbake.host import Host, detect_host, qemu_binary, resolve_accel
from cloudbake.log import stage_logger
from cloudbake.paths import Paths
from cloudbake.pipeline import Pipeline
from cloudbake.qemu import VmSpec
from cloudbake.runner import CommandTimeoutError, require_tool, run, spawn, tail
from cloudbake.seed import SUDO_NOPASSWD, SeedFiles, build_seed_iso, render_cloud_config, render_meta_data
from cloudbake.store import Manifest, published_image, verify_published
from cloudbake.units import human_bytes
from cloudbake.vm import VmRun, boot_with_fallback

log = stage_logger("test-image")
RUNS_FOLDER = ".runs"
PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class RunFiles:
    """The files of one run, all inside its own folder."""

    folder: Path

    @property
    def overlay(self) -> Path:
        return self.folder / "disk.qcow2"

    @property
    def client_key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.folder / "ssh_host_ed25519_key"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def seed(self) -> Path:
        return self.folder / "seed.iso"

    @property
    def serial_log(self) -> Path:
        return self.folder / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        return self.folder / "qmp.sock"

    @property
    def vars(self) -> Path:
        return self.folder / "efivars.fd"

    @property
    def owner(self) -> Path:
        return self.folder / "run.json"


# --- overlays and leftovers ---------------------------------------------------------------


def runs_root(base: Path) -> Path:
    """Runs live beside the base image, so overlays can name it by a relative path."""
    return base.parent / RUNS_FOLDER


def new_run(base: Path) -> RunFiles:
    root = runs_root(base)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    folder.mkdir(mode=0o700)
    return RunFiles(folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def clean_leftovers(base: Path) -> list[Path]:
    """Remove run folders whose owner died (Ctrl-C'd, killed, crashed), and their QEMU if it survived.

    Kept runs (keep=1) and runs whose owner is alive are left alone.
    """
    removed: list[Path] = []
    root = runs_root(base)
    if not root.is_dir():
        return removed
    for folder in sorted(root.iterdir()):
        owner = RunFiles(folder).owner
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("kept"):
            continue
        owner_pid = int(info.get("pid", 0))
        if owner_pid and _pid_alive(owner_pid):
            continue
        if not info and time.time() - folder.stat().st_mtime < 60:
            continue  # a run being set up right now, before its run.json exists
        qemu_pid = int(info.get("qemu_pid", 0))
        if qemu_pid and _pid_alive(qemu_pid) and str(folder) in _cmdline(qemu_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d leftover run folder(s) of runs that did not finish", len(removed))
    return removed


def make_overlay(base: Path, overlay: Path) -> None:
    """A copy-on-write overlay; the backing path is relative when the overlay sits beside the base."""
    qemu_img = require_tool("qemu-img", "qemu-utils")
    beside = base.parent.resolve() in overlay.parent.resolve().parents
    backing = os.path.relpath(base.resolve(), overlay.parent.resolve()) if beside else str(base.resolve())
    run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay], stage="test-image",
        timeout=60)


# --- keys and the seed --------------------------------------------------------------------


def make_keypair(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair; the private key is 0600. Returns the public key text."""
    keygen = require_tool("ssh-keygen", "openssh-client")
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], stage="test-image", timeout=30)
    os.chmod(path, 0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def run_seed_files(pipeline: Pipeline, client_public: str, host_private: str, host_public: str,
                   instance_id: str) -> SeedFiles:
    """The per-run seed: this run's login key and a pre-generated host key, nothing else re-applied."""
    user_data = {
        "users": [{"name": pipeline.cloud_init.user, "sudo": SUDO_NOPASSWD, "shell": "/bin/bash",
                   "lock_passwd": True, "ssh_authorized_keys": [client_public]}],
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_keys": {"ed25519_private": host_private, "ed25519_public": host_public},
        "ssh_genkeytypes": [],
    }
    return SeedFiles(render_cloud_config(user_data), render_meta_data(instance_id, pipeline.cloud_init.hostname))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- SSH ----------------------------------------------------------------------------------


def ssh_argv(files: RunFiles, port: int, user: str, command: str | None = None, *, connect_timeout: int = 10,
             tty: bool = False) -> list[str]:
    """OpenSSH with the host key pinned: no trust on first use, no agent, no user config."""
    argv = ["ssh", "-F", "none"]
    argv += ["-i", str(files.client_key)]
    argv += ["-p", str(port)]
    argv += ["-o", "IdentitiesOnly=yes"]
    argv += ["-o", "IdentityAgent=none"]
    argv += ["-o", "BatchMode=yes"]
    argv += ["-o", "StrictHostKeyChecking=yes"]
    argv += ["-o", f"UserKnownHostsFile={files.known_hosts}"]
    argv += ["-o", "GlobalKnownHostsFile=/dev/null"]
    argv += ["-o", "HostKeyAlgorithms=ssh-ed25519"]
    argv += ["-o", f"ConnectTimeout={connect_timeout}"]
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


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def wait_stage(vm: VmRun, deadline: Deadline, stage: str, check: Any, poll_s: float = 1.0) -> None:
    """Poll ``check()`` until it is true; fail naming the stage when the guest exits or time runs out."""
    while True:
        if vm.proc is not None and vm.proc.poll() is not None:
            raise vm.failure(f"the guest stopped (QEMU exit {vm.proc.returncode}) while waiting for: {stage}")
        if check():
            return
        if deadline.left() <= 0:
            raise vm.failure(f"test VM: '{stage}' did not happen within test.timeout ({deadline.total:.0f} s)",
                             hint=f"raise test.timeout, or look at the serial log: {vm.spec.serial_log}")
        time.sleep(poll_s)


def _ssh_ok(files: RunFiles, port: int, user: str, command: str, timeout: float) -> bool:
    try:
        result = run(ssh_argv(files, port, user, command, connect_timeout=5), stage="test-image", timeout=timeout,
                     check=False)
    except CommandTimeoutError:
        return False
    if result.returncode == 255 and "Host key verification failed" in result.stderr:
        raise _host_key_changed()
    return result.returncode == 0


def _host_key_changed() -> PipelineError:
    return PipelineError("the test VM presented an SSH host key other than the one injected for this run; "
                         "refusing to connect", hint="something else answers on the forwarded port, or the "
                                                     "guest's host key was replaced (by the test command?)")


# Lists the matches of each pattern (NUL-separated, relative to /) and archives them all in
# one tar stream, however many there are: tar reads the list itself, so nothing is split
# into several archives the way xargs would. An empty IFS keeps spaces in patterns while
# globs still expand.
ARTIFACTS_SCRIPT = ("IFS=''; "
                    'cd / && for p in "$@"; do for f in $p; do [ -e "$f" ] && printf "%s\\0" "${f#/}"; done; done '
                    '| tar --null --files-from=- -cf -')


class _CappedReader:
    """A file-like view of the artifact stream that refuses to read past ``limit`` bytes."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.limit, self.count = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise _ArtifactsTooLargeError()
        return data


class _ArtifactsTooLargeError(Exception):
    pass


def fetch_artifacts(files: RunFiles, port: int, user: str, patterns: tuple[str, ...], dest: Path, *,
                    max_bytes: int, timeout_s: float) -> list[str]:
    """Copy guest paths/globs into ``dest`` through one tar stream (read with sudo, extracted safely).

    The copy is bounded: at most ``max_bytes`` of tar stream and ``timeout_s`` seconds, and
    a copy that fails (tar or SSH exiting non-zero) is an error, never a partial success.
    ``dest`` is outside the run folder, which is thrown away with the VM.
    """
    if not patterns:
        return []
    remote = "sudo -n sh -c " + shlex.quote(ARTIFACTS_SCRIPT) + " sh " + " ".join(shlex.quote(p) for p in patterns)
    dest.mkdir(parents=True, exist_ok=True)
    with spawn(ssh_argv(files, port, user, remote), stage="test-image", stdout=subprocess.PIPE,
               stderr=subprocess.PIPE) as spawned:
        return _receive_artifacts(spawned.proc, dest, max_bytes=max_bytes, timeout_s=timeout_s)


def _receive_artifacts(proc: subprocess.Popen[bytes], dest: Path, *, max_bytes: int, timeout_s: float) -> list[str]:
    assert proc.stdout is not None and proc.stderr is not None
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    names: list[str] = []
    stream = _CappedReader(proc.stdout, max_bytes)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                _extract_safely(archive, member, dest)
                names.append(member.name)
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait(30)
    except _ArtifactsTooLargeError:
        raise PipelineError(f"the artifacts are larger than test.artifacts_max ({human_bytes(max_bytes)}); "
                            f"{len(names)} file(s) copied into {dest} before stopping",
                            hint="raise test.artifacts_max or narrow test.artifacts") from None
    except tarfile.TarError as err:
        proc.kill()
        proc.wait(30)
        stderr = proc.stderr.read().decode(errors="replace")
        if "Host key verification failed" in stderr:
            raise _host_key_changed() from None
        if not timer.is_alive():
            raise PipelineError(f"copying the artifacts did not finish within test.timeout ({timeout_s:.0f} s left)",
                                hint="raise test.timeout or narrow test.artifacts") from None
        raise PipelineError(f"the artifact stream from the guest is broken ({err})", hint=tail(stderr) or None) \
            from None
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    if proc.returncode == 255 and "Host key verification failed" in stderr:
        raise _host_key_changed()
    if proc.returncode != 0:
        raise PipelineError(f"copying the artifacts failed (exit status {proc.returncode}) after {len(names)} "
                            f"file(s):\n{tail(stderr)}",
                            hint="a file that cannot be read, or the guest's tar; see the message above")
    return names


def _extract_safely(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Only regular files and folders, only below ``dest``: the guest is not trusted to name host paths."""
    if hasattr(tarfile, "data_filter"):  # Python 3.11.4+ and distro backports
        try:
            archive.extract(member, dest, filter="data")
        except tarfile.FilterError as err:
            raise PipelineError(f"refusing artifact {member.name!r}: {err}") from None
        return
    target = (dest / member.name).resolve()
    if dest.resolve() not in target.parents or not (member.isfile() or member.isdir()):
        raise PipelineError(f"refusing artifact {member.name!r}: not a plain file below the artifacts folder")
    archive.extract(member, dest)


# --- one run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    exit_status: int
    folder: Path
    artifacts: list[str]
    artifacts_dir: Path
    port: int
    kept: bool


def current_base(pipeline: Pipeline, paths: Paths) -> tuple[Path, Manifest]:
    """The published image for the current key and its manifest, checked against its digest."""
    key, _, _, _ = resolve_key(pipeline, paths)
    base = published_image(paths, pipeline.name, key)
    if not base.is_file():
        raise PipelineError(f"no baked image for the current key ({base.name})", hint="run doit bake first")
    return base, verify_published(base)


def run_test_image(pipeline: Pipeline, paths: Paths, command: str | None = None, keep: bool = False,
                   timeout_s: float | None = None) -> RunResult:
    """Boot a throwaway overlay of the baked image, run the command over SSH, throw it all away."""
    base, manifest = current_base(pipeline, paths)
    clean_leftovers(base)
    files = new_run(base)
    deadline = Deadline(timeout_s or pipeline.test.timeout_s)
    kept = False
    try:
        host_public = prepare_run(pipeline, base, files, "run")
        result = _boot_and_run(pipeline, paths, base, manifest, files, command or pipeline.test.command, keep,
                               deadline, host_public)
        kept = result.kept
        return result
    finally:
        if not kept:
            shutil.rmtree(files.folder, ignore_errors=True)


def prepare_run(pipeline: Pipeline, base: Path, files: RunFiles, label: str) -> str:
    """Owner record, overlay, this run's key pair and host key, and its seed; returns the host's public key."""
    write_atomically(files.owner, json.dumps({"pid": os.getpid(), "base": base.name}).encode(), mode=0o600)
    make_overlay(base, files.overlay)
    client_public = make_keypair(files.client_key, f"cloudbake-{label}-{files.folder.name}")
    host_public = make_keypair(files.host_key, f"cloudbake-{label}-host")
    seed = run_seed_files(pipeline, client_public, files.host_key.read_text(), host_public,
                          f"cloudbake-{label}-{secrets.token_hex(8)}")
    build_seed_iso(seed, files.seed)
    os.chmod(files.seed, 0o600)  # it carries the private host key
    files.host_key.unlink()  # the guest has it now; the host only needs the public half
    return host_public


def _spec_for(pipeline: Pipeline, paths: Paths, manifest: Manifest, files: RunFiles, port: int,
              host: Host, accel: str) -> VmSpec:
    firmware = manifest.firmware
    spec = VmSpec(name=f"{pipeline.name}-test", arch=pipeline.source.arch, accel=accel, cpus=pipeline.vm.cpus,
                  memory_mib=pipeline.vm.memory_bytes >> 20, disk=files.overlay, serial_log=files.serial_log,
                  qmp_socket=files.qmp_socket, seed=files.seed, firmware=firmware, ssh_port=port,
                  extra_args=pipeline.vm.qemu_args)
    return with_uefi(spec, host, paths.cache_dir, files.vars) if firmware == "uefi" else spec


@contextlib.contextmanager
def _started_vm(pipeline: Pipeline, paths: Paths, manifest: Manifest, files: RunFiles) -> Iterator[
        tuple[VmRun, int]]:
    """Boot with a free forwarded port; another run grabbing the same port in between means a retry."""
    host = detect_host()
    choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, host, paths.cache_dir)
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        spec = _spec_for(pipeline, paths, manifest, files, port, host, choice.accel)
        with boot_with_fallback(spec, choice, paths.cache_dir, "test-image") as (vm, _):
            time.sleep(0.5)
            if vm.proc is not None and vm.proc.poll() is not None and "hostfwd" in vm.qemu_stderr() \
                    and attempt + 1 < PORT_ATTEMPTS:
                log.info("port %d was taken before QEMU could bind it; trying another", port)
                continue
            info = json.loads(files.owner.read_text())
            info["qemu_pid"] = vm.proc.pid if vm.proc else 0
            write_atomically(files.owner, json.dumps(info).encode(), mode=0o600)
            yield vm, port
            return
    raise PipelineError("could not bind a forwarded SSH port on 127.0.0.1")


def _boot_and_run(pipeline: Pipeline, paths: Paths, base: Path, manifest: Manifest, files: RunFiles,
                  command: str, keep: bool, deadline: Deadline, host_public: str) -> RunResult:
    user = pipeline.cloud_init.user
    with _started_vm(pipeline, paths, manifest, files) as (vm, port):
        files.known_hosts.write_text(f"[127.0.0.1]:{port} {host_public}\n")
        log.info("test VM of %s booting (run folder %s, SSH on 127.0.0.1:%d)", base.name, files.folder, port)
        wait_stage(vm, deadline, "SSH port answers", lambda: ssh_banner(port))
        wait_stage(vm, deadline, "SSH login with the run's key",
                   lambda: _ssh_ok(files, port, user, "true", timeout=30))
        wait_stage(vm, deadline, "cloud-init finished (cloud-init status --wait)",
                   lambda: _ssh_ok(files, port, user, "cloud-init status --wait >/dev/null; test $? -ne 1",
                                   timeout=max(5.0, deadline.left())))
        log.info("running: %s", command)
        try:
            status = run(ssh_argv(files, port, user, command), stage="test-image",
                         timeout=max(1.0, deadline.left()), check=False, capture=False).returncode
        except CommandTimeoutError:
            raise vm.failure(f"the test command did not finish within test.timeout ({deadline.total:.0f} s)") \
                from None
        artifacts_dir = paths.work_dir / "artifacts" / files.folder.name
        artifacts = fetch_artifacts(files, port, user, pipeline.test.artifacts, artifacts_dir,
                                    max_bytes=pipeline.test.artifacts_max_bytes,
                                    timeout_s=max(1.0, deadline.left()))
        if artifacts:
            log.info("copied %d artifact(s) into %s", len(artifacts), artifacts_dir)
        if keep:
            vm.keep_running()
            info = json.loads(files.owner.read_text())
            write_atomically(files.owner, json.dumps({**info, "kept": True}).encode(), mode=0o600)
            log.info("keep=1: the VM keeps running.\n  ssh: %s\n  monitor: nc -U %s   (QMP; 'socat - UNIX-CONNECT:"
                     "%s' works too)\n  serial log: %s\n  stop it: kill %d, then rm -r %s",
                     shlex.join(ssh_argv(files, port, user)), vm.spec.qmp_socket, vm.spec.qmp_socket, files.serial_log,
                     vm.proc.pid if vm.proc else 0, files.folder)
        else:
            with contextlib.suppress(PipelineError):
                run(ssh_argv(files, port, user, "sudo -n poweroff"), stage="test-image", timeout=30, check=False)
            with contextlib.suppress(PipelineError):
                vm.wait(60, poll_s=0.5)
    return RunResult(status, files.folder, artifacts, artifacts_dir, port, keep)


def run_test_task(pipeline: Pipeline, paths: Paths, command: str | None = None, keep: bool = False) -> None:
    result = run_test_image(pipeline, paths, command, keep)
    if result.exit_status != 0:
        raise PipelineError(f"the test command failed with exit status {result.exit_status}",
                            hint="its output is above; the VM was thrown away (keep=1 keeps it for a look)")
    log.info("the test command passed")


def run_console(pipeline: Pipeline, paths: Paths) -> None:
    """An interactive throwaway VM: serial console on this terminal (Ctrl-A X quits), deleted afterwards."""
    base, manifest = current_base(pipeline, paths)
    clean_leftovers(base)
    files = new_run(base)
    try:
        host_public = prepare_run(pipeline, base, files, "console")
        port = free_port()
        files.known_hosts.write_text(f"[127.0.0.1]:{port} {host_public}\n")
        host = detect_host()
        choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, host, paths.cache_dir)
        spec = dataclasses.replace(_spec_for(pipeline, paths, manifest, files, port, host, choice.accel),
                                   interactive=True)
        log.info("console VM (accel %s); from another terminal: %s\n  Ctrl-A X quits; the VM is thrown away",
                 choice.accel, shlex.join(ssh_argv(files, port, pipeline.cloud_init.user)))
        with VmRun(spec, qemu_binary(spec.arch), "console") as vm:
            vm.wait(float("inf"), poll_s=0.5)
    finally:
        shutil.rmtree(files.folder, ignore_errors=True)
