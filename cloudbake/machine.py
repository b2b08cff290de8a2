"""A throwaway VM of the baked image, ready over SSH: the one implementation behind
``test-image``, ``up``, the Python API and the pytest plugin.

Every VM has its own run folder (overlay, SSH key pair, pinned host key, seed, firmware vars),
forwarded ports on 127.0.0.1 and a record (``run.json``) that ``ps`` and ``down`` read; the
base image is only ever read. Whatever ends a VM's block, its QEMU is stopped and its folder
(private key included) removed, unless it was detached on purpose (``up``, ``--keep``).
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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cloudbake.build import resolve_key
from cloudbake.errors import MachineryError, PipelineError
from cloudbake.files import write_atomically
from cloudbake.firmware import find_uefi, pflash_code, with_uefi
from cloudbake.host import Host, detect_host, host_cpu_identity, qemu_binary, qemu_version, resolve_accel
from cloudbake.log import stage_logger
from cloudbake.paths import Paths
from cloudbake.pipeline import Forward, Pipeline
from cloudbake.qemu import VmSpec
from cloudbake.runner import Arg, CommandTimeoutError, require_tool, run, spawn, stop_process, tail
from cloudbake.seed import SUDO_NOPASSWD, SeedFiles, build_seed_iso, render_cloud_config, render_meta_data
from cloudbake.store import Manifest, published_image, verify_chain
from cloudbake.transfer import host_key_changed, receive_tar, send_tar
from cloudbake.units import human_bytes
from cloudbake.vmrun import VmRun, boot_with_fallback, qmp_command
from cloudbake.warm import (
    WarmSet,
    arm_key_listener_script,
    build_lock,
    discard,
    failed_save,
    failed_save_marker,
    find_warm_set,
    hand_over_key,
    image_identity,
    incoming_uri,
    keep_as_warm_set,
    remember_failed_save,
    save_state,
    saved_on_another_cpu,
    sweep_orphans,
    verify_set,
    wait_restored,
    warm_inputs,
    warm_key,
    warm_set_for,
)

log = stage_logger("test-image")
RUNS_FOLDER = ".runs"
PORT_ATTEMPTS = 3
# Guest-side files of cloudbake's own: the command's environment and its recorded exit status.
GUEST_STATE = "~/.cloudbake"


@dataclass(frozen=True)
class RunFiles:
    """The files of one run, all inside its own folder."""

    folder: Path

    @property
    def id(self) -> str:
        return self.folder.name

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
    def key_socket(self) -> Path:
        return self.folder / "key.sock"

    @property
    def owner(self) -> Path:
        return self.folder / "run.json"

    def record(self) -> dict[str, Any]:
        try:
            info = json.loads(self.owner.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def update_record(self, **fields: Any) -> None:
        write_atomically(self.owner, json.dumps({**self.record(), **fields}).encode(), mode=0o600)


# --- run folders, leftovers and the VMs that are up ---------------------------------------


def runs_root(base: Path) -> Path:
    """Runs live beside the base image, so overlays can name it by a relative path."""
    return base.parent / RUNS_FOLDER


def new_run(base: Path) -> RunFiles:
    root = runs_root(base)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    folder.mkdir(mode=0o700)
    return RunFiles(folder)


def pid_alive(pid: int) -> bool:
    """``kill -0``: works wherever Python does, without /proc."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_qemu(info: dict[str, Any]) -> bool:
    """The recorded QEMU is still that QEMU: alive and started when the record says (pids get reused)."""
    pid = int(info.get("qemu_pid", 0))
    return pid_alive(pid) and _process_start_marker(pid) == info.get("qemu_started")


def _process_start_marker(pid: int) -> str | None:
    """A value that changes when a pid is reused: the process's start time as ``ps`` reports it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return out or None
    return None


@dataclass(frozen=True)
class RunInfo:
    """One run folder as ``ps`` shows it."""

    files: RunFiles
    state: str          # running | kept | leftover
    base: str
    ssh_port: int | None
    forwards: dict[int, int]
    user: str
    age_s: float
    qemu_pid: int


def list_runs(base_dir: Path) -> list[RunInfo]:
    """The run folders under ``base_dir`` (the output folder), newest last."""
    root = base_dir / RUNS_FOLDER
    if not root.is_dir():
        return []
    runs = []
    for folder in sorted(root.iterdir()):
        files = RunFiles(folder)
        info = files.record()
        alive = _is_our_qemu(info)
        if info.get("kept") and alive:
            state = "kept"
        elif pid_alive(int(info.get("pid", 0))) and (alive or not info.get("qemu_pid")):
            state = "running"
        else:
            state = "leftover"
        try:
            age = time.time() - folder.stat().st_mtime
        except OSError:
            continue  # removed while we looked
        runs.append(RunInfo(files, state, str(info.get("base", "?")), info.get("ssh_port"),
                            {int(k): int(v) for k, v in info.get("forwards", {}).items()},
                            str(info.get("user", "")), age, int(info.get("qemu_pid", 0))))
    return runs


def stop_run(files: RunFiles) -> None:
    """Stop a run's QEMU (QMP quit, then kill) and delete its folder, keys and overlay included."""
    info = files.record()
    if _is_our_qemu(info):
        with contextlib.suppress(Exception):
            qmp_command(files.qmp_socket, "quit", timeout=2.0)
        pid = int(info["qemu_pid"])
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(files.folder, ignore_errors=True)


def clean_leftovers(base: Path) -> list[Path]:
    """Remove run folders whose owner died (Ctrl-C'd, killed, crashed) and kept runs whose QEMU is gone.

    A run being set up right now (no record yet) and runs whose owner or kept QEMU is alive
    are left alone.
    """
    removed: list[Path] = []
    for info in list_runs(base.parent):
        if info.state != "leftover":
            continue
        folder = info.files.folder
        try:
            being_set_up = not info.files.record() and time.time() - folder.stat().st_mtime < 60
        except FileNotFoundError:
            continue  # another process cleaned it up after we listed it
        if being_set_up:
            continue
        stop_run(info.files)
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


def prepare_run(pipeline: Pipeline, base: Path, files: RunFiles, label: str) -> str:
    """Owner record, overlay, this run's key pair and host key, and its seed; returns the host's public key."""
    write_atomically(files.owner, json.dumps({"pid": os.getpid(), "base": base.name, "label": label,
                                              "user": pipeline.cloud_init.user}).encode(), mode=0o600)
    make_overlay(base, files.overlay)
    client_public = make_keypair(files.client_key, f"cloudbake-{label}-{files.id}")
    host_public = make_keypair(files.host_key, f"cloudbake-{label}-host")
    seed = run_seed_files(pipeline, client_public, files.host_key.read_text(), host_public,
                          f"cloudbake-{label}-{secrets.token_hex(8)}")
    build_seed_iso(seed, files.seed)
    os.chmod(files.seed, 0o600)  # it carries the private host key
    files.host_key.unlink()  # the guest has it now; the host only needs the public half
    return host_public


def is_port_clash(err: Exception) -> bool:
    """QEMU could not listen on a forwarded port (another program took it after free_port chose it)."""
    return "host forwarding rule" in str(err) or ("hostfwd" in str(err) and "in use" in str(err))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_forwards(forwards: Sequence[Forward]) -> tuple[Forward, ...]:
    """Pick free host ports for the forwards that asked for any port."""
    return tuple(Forward(f.host or free_port(), f.guest) for f in forwards)


# --- SSH ----------------------------------------------------------------------------------


def ssh_argv(files: RunFiles, port: int, user: str, command: str | None = None, *, connect_timeout: int = 10,
             tty: bool = False, identity: Path | None = None) -> list[str]:
    """OpenSSH with the host key pinned: no trust on first use, no agent, no user config.

    ``identity`` is the client key (default: the run's own).
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


def remote_path(path: str) -> str:
    """A guest path for a shell command line: ``~`` and ``~/x`` become the run user's home, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


# --- a VM -----------------------------------------------------------------------------------


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


def current_base(pipeline: Pipeline, paths: Paths) -> tuple[Path, Manifest]:
    """The published image for the current key and its manifest, checked against its digest."""
    key, _, _, _ = resolve_key(pipeline, paths)
    base = published_image(paths, pipeline.name, key)
    if not base.is_file():
        raise PipelineError(f"no baked image for the current key ({base.name})",
                            hint="run cloudbake bake (or doit bake) first")
    return base, verify_chain(base)


def warm_inputs_for_key(pipeline: Pipeline, paths: Paths, manifest: Manifest, accel: str,
                        version: str) -> dict[str, Any]:
    """What a warm set of this pipeline's VM depends on (no files touched).

    The same spec fields as a real VM's (vm_spec), so the set saved from a real VM is found.
    """
    spec = VmSpec(name=f"{pipeline.name}-test", arch=pipeline.source.arch, accel=accel, cpus=pipeline.vm.cpus,
                  memory_mib=pipeline.vm.memory_bytes >> 20, disk=Path("disk.qcow2"), serial_log=Path("serial.log"),
                  qmp_socket=Path("qmp.sock"), firmware=manifest.firmware, extra_args=pipeline.vm.qemu_args,
                  key_channel=Path("key.sock"))
    if manifest.firmware == "uefi":
        firmware = find_uefi(pipeline.source.arch, detect_host())
        spec = dataclasses.replace(spec, firmware_code=pflash_code(firmware, pipeline.source.arch, paths.cache_dir))
    return warm_inputs(spec, version, image_identity(manifest), host_cpu_identity())


def resolve_warm_key(pipeline: Pipeline, paths: Paths, manifest: Manifest, accel: str, version: str) -> str:
    """The key of the warm set a VM of this pipeline would restore from (no files touched)."""
    return warm_key(warm_inputs_for_key(pipeline, paths, manifest, accel, version))


def current_warm_set(pipeline: Pipeline, paths: Paths) -> WarmSet | None:
    """The warm set this host's test VMs of the published image would resume from, if it is saved."""
    base, manifest = current_base(pipeline, paths)
    choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, detect_host(), paths.cache_dir)
    version = qemu_version(qemu_binary(pipeline.source.arch))
    return find_warm_set(base, resolve_warm_key(pipeline, paths, manifest, choice.accel, version))


def ensure_warm_set(pipeline: Pipeline, paths: Paths) -> WarmSet | None:
    """The warm set of the published image for this host: found, or made now (one boot and a save).

    What ``doit warm`` runs after the bake, so a CI cache saved after it carries the set and the
    first test run of every fresh runner resumes warm. None when saving is not possible here
    (said in one warning line; test runs then boot cold).
    """
    machine = Machine(pipeline, paths, label="warm", warm=True)
    try:
        machine.base, manifest = current_base(pipeline, paths)
    except PipelineError as err:
        raise MachineryError.from_error("base image", err) from None
    return machine._warm_set(manifest)


def vm_spec(pipeline: Pipeline, paths: Paths, manifest: Manifest, files: RunFiles, port: int,
            forwards: tuple[Forward, ...], host: Host, accel: str, *, key_channel: bool = False) -> VmSpec:
    """A test VM's spec; ``key_channel``: the warm start's key port (the saving VM and every restore)."""
    firmware = manifest.firmware
    spec = VmSpec(name=f"{pipeline.name}-test", arch=pipeline.source.arch, accel=accel, cpus=pipeline.vm.cpus,
                  memory_mib=pipeline.vm.memory_bytes >> 20, disk=files.overlay, serial_log=files.serial_log,
                  qmp_socket=files.qmp_socket, seed=files.seed, firmware=firmware, ssh_port=port,
                  forwards=tuple((f.host, f.guest) for f in forwards), extra_args=pipeline.vm.qemu_args,
                  key_channel=files.key_socket if key_channel else None)
    return with_uefi(spec, host, paths.cache_dir, files.vars) if firmware == "uefi" else spec


class Machine:
    """A throwaway VM of the pipeline's baked image, booted and ready over SSH.

    ``start()`` (or entering the block) boots an overlay, waits until the run user logs in
    with this run's key and cloud-init is done, and creates ``test.workdir``. Commands run
    there with ``test.env`` set. ``close()`` (or leaving the block) powers the guest off and
    deletes the run folder; ``detach()`` leaves it running for ``ps``/``ssh``/``down``.

    Failures of the machinery raise MachineryError naming the stage; a command's own
    status is returned, never raised, unless ``check=True``.
    """

    def __init__(self, pipeline: Pipeline, paths: Paths, *, label: str = "run", timeout_s: float | None = None,
                 env: dict[str, str] | None = None, output_prefix: str | None = None,
                 timeout_per_step: bool = False, warm: bool | None = None, prepare_guest: bool = True,
                 key_channel: bool = False, interactive: bool = False) -> None:
        """``timeout_s`` (default test.timeout) bounds the whole life of the VM, boot included, as
        test-image wants; with ``timeout_per_step`` it bounds the boot and each step on its own
        (a session-long VM of the API or the pytest plugin). ``warm`` (default test.warm) resumes
        from the image's warm set; ``prepare_guest=False`` leaves the working folder and the
        environment file out (the VM that a warm set is saved from must not carry them)."""
        self.pipeline, self.paths, self.label = pipeline, paths, label
        self.user = pipeline.cloud_init.user
        self.timeout_s = timeout_s or pipeline.test.timeout_s
        self.timeout_per_step = timeout_per_step
        self.warm = pipeline.test.warm if warm is None else warm
        self.prepare_guest = prepare_guest
        self.key_channel = key_channel   # the VM a warm set is saved from has the key port
        self.interactive = interactive   # the serial console on this terminal (doit console)
        self.deadline = Deadline(self.timeout_s)
        self.extra_env = dict(env or {})
        self.output_prefix = output_prefix
        self.files: RunFiles | None = None
        self.vm: VmRun | None = None
        self.ssh_port = 0
        self.forwards: tuple[Forward, ...] = ()
        self.base: Path | None = None
        self.detached = False
        self.warm_set: WarmSet | None = None     # the set this VM resumed from, when it started warm
        self._stack = contextlib.ExitStack()
        self._status_nonce = secrets.token_hex(4)
        self._ready = False

    # -- lifecycle --

    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(*exc)

    def start(self) -> Machine:
        try:
            self.base, manifest = current_base(self.pipeline, self.paths)
        except PipelineError as err:
            raise MachineryError.from_error("base image", err) from None
        clean_leftovers(self.base)
        self.files = new_run(self.base)
        try:
            warm = self._warm_set(manifest) if self.warm else None
            if warm is None or not self._start_warm(warm, manifest):
                self._start_cold(manifest)
            if self.prepare_guest:
                self._prepare_guest()
            self._ready = True
        except BaseException:
            self.close(*sys.exc_info())
            raise
        return self

    def _start_cold(self, manifest: Manifest) -> None:
        """Boot the overlay with this run's seed; ready once the run user logs in and cloud-init is done."""
        assert self.base is not None and self.files is not None
        host_public = prepare_run(self.pipeline, self.base, self.files, self.label)
        self.vm, self.ssh_port = self._boot(manifest)
        files = self.files
        files.known_hosts.write_text(f"[127.0.0.1]:{self.ssh_port} {host_public}\n")
        self._record_vm()
        self.say("VM of %s booting (run %s, SSH on 127.0.0.1:%d%s)", self.base.name, files.id, self.ssh_port,
                  self._forwards_text())
        self._wait("boot: SSH port answers", lambda: ssh_banner(self.ssh_port))
        self._wait("ssh: login with the run's key", lambda: self._ssh_ok("true", 30))
        self._wait("cloud-init: finished (cloud-init status --wait)",
                   lambda: self._ssh_ok("cloud-init status --wait >/dev/null; test $? -ne 1",
                                        max(5.0, self.deadline.left())))

    def _record_vm(self) -> None:
        assert self.files is not None and self.vm is not None
        pid = self.vm.proc.pid if self.vm.proc else 0
        self.files.update_record(ssh_port=self.ssh_port, forwards={f.guest: f.host for f in self.forwards},
                                 qemu_pid=pid, qemu_started=_process_start_marker(pid) if pid else None)

    def _forwards_text(self) -> str:
        return "".join(f", guest port {f.guest} on 127.0.0.1:{f.host}" for f in self.forwards)

    # -- warm start --

    def _warm_set(self, manifest: Manifest) -> WarmSet | None:
        """The warm set of this image and QEMU setup; built now (one cold boot and a save) when missing.

        A build that fails is reported and the run boots cold: warm start is an optimization.
        """
        assert self.base is not None
        sweep_orphans(self.base)
        choice = resolve_accel(self.pipeline.vm.accel, self.pipeline.source.arch, detect_host(),
                               self.paths.cache_dir)
        version = qemu_version(qemu_binary(self.pipeline.source.arch))
        key = resolve_warm_key(self.pipeline, self.paths, manifest, choice.accel, version)
        found = find_warm_set(self.base, key)
        if found is not None:
            return found
        other = saved_on_another_cpu(self.base, warm_inputs_for_key(self.pipeline, self.paths, manifest,
                                                                    choice.accel, version))
        if other is not None:
            log.warning("the warm state of %s was saved on another CPU (%s); this host's CPU (%s) may lack its "
                        "features, so it is not resumed here; this run boots cold", self.base.name,
                        other.get("host_cpu_model", "unknown"), host_cpu_identity()["model"])
        failed = failed_save(self.base, key)
        if failed is not None:
            log.info("not saving a warm state of %s: saving one failed within the last day (%s); this run boots "
                     "cold (delete %s to try again)", self.base.name, failed, failed_save_marker(self.base, key))
            return None
        with build_lock(self.base, key):
            found = find_warm_set(self.base, key)
            if found is not None:
                return found
            try:
                return self._build_warm_set(manifest, version)
            except MachineryError:
                raise
            except PipelineError as err:
                log.warning("could not save a warm state of %s (%s); this run boots cold, and later runs do not "
                            "try again for a day", self.base.name, err.message)
                remember_failed_save(self.base, key, err.message.splitlines()[0])
                return None

    def _build_warm_set(self, manifest: Manifest, version: str) -> WarmSet:
        """Boot the image once with the key port, arm the key listener, save the state into a new set."""
        assert self.base is not None
        self.say("no warm state of %s for this QEMU setup yet: booting it once to save one", self.base.name)
        builder = Machine(self.pipeline, self.paths, label="warm", warm=False, prepare_guest=False,
                          key_channel=True)
        builder.start()
        try:
            assert builder.vm is not None and builder.files is not None
            spec = builder.vm.spec
            inputs = warm_inputs(spec, version, image_identity(manifest), host_cpu_identity())
            warm = warm_set_for(self.base, warm_key(inputs))
            saved_with = builder.files.client_key.with_name("id_ed25519.pub").read_text().strip()
            armed = run(builder.ssh_argv(arm_key_listener_script(self.user, saved_with)), stage="test-image",
                        timeout=60, check=False)
            if armed.returncode != 0:
                raise PipelineError(f"could not start the key listener in the VM to save (exit status "
                                    f"{armed.returncode}): {tail(armed.stderr) or 'no output'}")
            state = builder.files.folder / "state.zst"
            save_s = save_state(builder.vm, state)
            host_public = builder.files.known_hosts.read_text().split(" ", 1)[1].strip()
            record: dict[str, Any] = {
                "inputs": inputs, "accel": spec.accel, "host_public": host_public, "saved_with": saved_with,
                "host_cpu_model": host_cpu_identity()["model"], "user": self.user,
                "state_bytes": state.stat().st_size, "memory_bytes": spec.memory_mib << 20,
                "save_s": round(save_s, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            keep_as_warm_set(warm, builder.files.overlay, spec.firmware_vars, builder.files.seed, state, record)
        finally:
            builder.close()
        self.say("saved the warm state of %s: %s (guest RAM %s) in %.1f s", self.base.name,
                  human_bytes(record["state_bytes"]), human_bytes(record["memory_bytes"]), save_s)
        return warm

    def _start_warm(self, warm: WarmSet, manifest: Manifest) -> bool:
        """Resume a new overlay of the warm disk from the saved state; False when it fails (then boot cold).

        The set is checked against its recorded digests first (it may have come from a cache).
        A failure of the set itself discards it; a port taken meanwhile by another program is
        tried again on other ports and never costs the shared set.
        """
        assert self.base is not None and self.files is not None
        started = time.monotonic()
        try:
            verify_set(warm, self.base)
            record = warm.record()
            files = self.files
            files.update_record(pid=os.getpid(), base=self.base.name, label=self.label, user=self.user, warm=True)
            make_overlay(warm.disk, files.overlay)
            client_public = make_keypair(files.client_key, f"cloudbake-{self.label}-{files.id}")
        except (PipelineError, OSError, ValueError, KeyError) as err:
            return self._warm_failed(warm, err)
        for attempt in range(PORT_ATTEMPTS):
            booting = contextlib.ExitStack()
            try:
                port = free_port()
                self.forwards = resolve_forwards(self.pipeline.test.forward)
                spec = vm_spec(self.pipeline, self.paths, manifest, files, port, self.forwards, detect_host(),
                               record["accel"], key_channel=True)
                if spec.firmware_vars is not None:
                    shutil.copyfile(warm.vars, spec.firmware_vars)
                spec = dataclasses.replace(spec, seed=warm.seed, incoming=incoming_uri(warm.state),
                                           interactive=self.interactive)
                vm = booting.enter_context(VmRun(spec, qemu_binary(spec.arch), "test-image"))
                load_s = wait_restored(vm)
                self.vm, self.ssh_port = vm, port
                files.known_hosts.write_text(f"[127.0.0.1]:{port} {record['host_public']}\n")
                assert vm.spec.key_channel is not None
                hand_over_key(vm.spec.key_channel, client_public)
                self._wait("ssh: login with the run's key", lambda: self._ssh_ok("true", 30))
            except (PipelineError, OSError, ValueError, KeyError) as err:
                booting.close()
                self.vm, self.ssh_port = None, 0
                if is_port_clash(err) and attempt + 1 < PORT_ATTEMPTS:
                    log.info("a forwarded port was taken meanwhile; resuming again on other ports")
                    continue
                if is_port_clash(err):
                    log.warning("the forwarded ports kept being taken; this run boots cold (the warm set is kept)")
                    self._reset_run_folder()
                    return False
                return self._warm_failed(warm, err)
            break
        self._stack.enter_context(booting)
        self.warm_set = warm
        self._record_vm()
        self.say("VM of %s resumed warm in %.1f s (state loaded in %.1f s; run %s, SSH on 127.0.0.1:%d%s)",
                  self.base.name, time.monotonic() - started, load_s, files.id, port, self._forwards_text())
        return True

    def _warm_failed(self, warm: WarmSet, err: Exception) -> bool:
        discard(warm, str(err).splitlines()[0] if str(err) else type(err).__name__)
        self._reset_run_folder()
        return False

    def _reset_run_folder(self) -> None:
        """Back to a fresh run folder (the record kept) for a cold boot after a failed warm start."""
        assert self.files is not None
        for path in self.files.folder.iterdir():
            if path != self.files.owner:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

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
        assert self.files is not None
        return ssh_argv(self.files, self.ssh_port, self.user, command, tty=tty)

    # -- commands and files --

    def run(self, command: str, *, check: bool = False, timeout: float | None = None,
            env: dict[str, str] | None = None, capture: bool = True) -> CommandResult:
        """Run ``command`` with the run user's shell in ``test.workdir``, ``test.env`` and ``env`` set.

        Returns its status and output (``capture=False`` streams the output instead, prefixed
        with ``[run N]`` when the VM has an output prefix). ``check=True`` raises
        CommandFailedError on a non-zero status. Only the machinery raises otherwise: no
        SSH (MachineryError ``ssh``), no answer within ``timeout`` (MachineryError ``timeout``).
        """
        if env:
            self._write_env(env, name=f"env.{self._status_nonce}")
        script = self._command_script(command, extra_env=bool(env))
        limit = timeout if timeout is not None else self._time_left()
        try:
            if capture or self.output_prefix is None:
                result = run(self.ssh_argv(script), stage="test-image", timeout=limit, check=False, capture=capture)
                status, stdout, stderr = result.returncode, result.stdout, result.stderr
            else:
                status, stdout, stderr = self._run_prefixed(script, limit), "", ""
        except CommandTimeoutError:
            raise MachineryError("timeout", f"the command did not finish within {limit:.0f} s: {command}",
                                 hint="raise test.timeout (or the timeout you passed)") from None
        if status == 255:
            status = self._status_after_disconnect(stderr)
        result_ = CommandResult(status, stdout, stderr)
        if check and status != 0:
            raise CommandFailedError(command, result_)
        return result_

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a host file or folder into the guest (``~`` is the run user's home).

        A folder's contents go into the folder ``remote`` (created, merged with what is there);
        a file becomes ``remote``, or goes inside it when ``remote`` is a folder.
        """
        local = Path(local)
        target = remote_path(remote)
        if local.is_dir():
            tar: list[Arg] = [require_tool("tar", "tar"), "-c", "-f", "-", "-C", local, "."]
            unpack = f"mkdir -p {target} && tar -x -f - -C {target} --no-same-owner --warning=no-timestamp"
        elif local.is_file():
            tar = [require_tool("tar", "tar"), "-c", "-f", "-", "-C", local.parent, local.name]
            name = shlex.quote(local.name)
            unpack = (f"set -e; t=$(mktemp -d); trap 'rm -rf \"$t\"' EXIT; tar -x -f - -C \"$t\" --no-same-owner "
                      f"--warning=no-timestamp; if [ -d {target} ]; then mv \"$t\"/{name} {target}/; "
                      f"else mkdir -p \"$(dirname {target})\" && mv \"$t\"/{name} {target}; fi")
        else:
            raise PipelineError(f"{local}: no such file or folder to copy into the guest")
        try:
            send_tar(tar, self.ssh_argv(unpack), cwd=local.parent, what=f"copying {local} into the guest",
                     timeout_s=self._time_left())
        except PipelineError as err:
            raise MachineryError.from_error("put", err) from None

    def get(self, remote: str, local: Path | str, *, max_bytes: int | None = None) -> Path:
        """Copy a guest file or folder to ``local`` on the host (read with sudo, extracted safely)."""
        local = Path(local)
        limit = max_bytes or self.pipeline.test.artifacts_max_bytes
        pack = (f"p={remote_path(remote)}; cd \"$(dirname \"$p\")\" && "
                f"sudo -n tar -c -f - -- \"$(basename \"$p\")\"")
        with tempfile.TemporaryDirectory(prefix=".cloudbake-get-", dir=local.parent if local.parent.is_dir()
                                         else None) as tmp:
            try:
                names = receive_tar(self.ssh_argv(pack), Path(tmp), what=f"copying {remote} out of the guest",
                                    max_bytes=limit, timeout_s=self._time_left(),
                                    limit_name="max_bytes", too_large_hint="pass a larger max_bytes")
            except PipelineError as err:
                raise MachineryError.from_error("get", err) from None
            if not names:
                raise MachineryError("get", f"{remote}: nothing to copy out of the guest")
            # The guest was asked for one file or folder: every member must lie under the
            # first one, a single plain name. Anything else is refused before the caller's
            # path is touched.
            top = names[0].split("/", 1)[0]
            if names[0] != top or any(name != top and not name.startswith(top + "/") for name in names):
                raise MachineryError("get", f"{remote}: the guest sent {names[0][:200]!r} and more than the one "
                                            "file or folder asked for; refused, nothing copied")
            local.parent.mkdir(parents=True, exist_ok=True)
            old = Path(tmp) / ".replaced"
            moved = local.is_dir() and not local.is_symlink()
            try:
                if moved:
                    os.replace(local, old)    # moved aside, deleted with the temporary folder
                os.replace(Path(tmp) / top, local)
            except OSError as err:
                if moved and not local.exists():
                    os.replace(old, local)
                raise MachineryError("get", f"cannot put {remote} at {local}: {err.strerror or err}") from None
        return local

    def fetch_artifacts(self, patterns: Sequence[str], dest: Path) -> list[str]:
        """Copy guest paths/globs into ``dest`` through one tar stream, bounded by test.artifacts_max."""
        if not patterns:
            return []
        remote = "sudo -n sh -c " + shlex.quote(ARTIFACTS_SCRIPT) + " sh " + " ".join(shlex.quote(p) for p in patterns)
        try:
            return receive_tar(self.ssh_argv(remote), dest, what="copying the artifacts",
                               max_bytes=self.pipeline.test.artifacts_max_bytes,
                               timeout_s=self._time_left(),
                               limit_name="test.artifacts_max",
                               too_large_hint="raise test.artifacts_max or narrow test.artifacts")
        except PipelineError as err:
            raise MachineryError.from_error("artifacts", err) from None

    def upload_project(self) -> None:
        """Send what test.upload selects (by default the git work tree) into test.workdir."""
        from cloudbake.upload import upload_selection

        try:
            selection = upload_selection(self.pipeline)
        except PipelineError as err:
            raise MachineryError.from_error("upload", err) from None
        if selection is None:
            return
        root, names = selection
        if not names:
            self.say("test.upload selects no files in %s: nothing uploaded", root)
            return
        total = sum(os.lstat(root / name).st_size for name in names if not os.path.isdir(root / name))
        self.say("uploading %d path(s), %s, from %s into %s", len(names), human_bytes(total), root,
                  self.pipeline.test.workdir)
        self.upload_tree(root, names)

    def upload_tree(self, root: Path, names: Sequence[str]) -> None:
        """Stream ``names`` (relative to ``root``) into ``test.workdir`` as one tar, owned by the run user."""
        assert self.files is not None
        listing = self.files.folder / "upload.list"
        listing.write_bytes(b"".join(os.fsencode(name) + b"\0" for name in names))
        # --no-recursion: the listing names every file itself (upload.py), cloudbake's own folders left out.
        tar: list[Arg] = [require_tool("tar", "tar"), "-c", "-f", "-", "--no-recursion", "--null", "-T", listing]
        unpack = (f"tar -x -f - -C {remote_path(self.pipeline.test.workdir)} --no-same-owner "
                  "--warning=no-timestamp")
        try:
            send_tar(tar, self.ssh_argv(unpack), cwd=root, what="upload", timeout_s=self._time_left())
        except PipelineError as err:
            raise MachineryError.from_error("upload", err) from None
        finally:
            listing.unlink(missing_ok=True)

    # -- inside --

    def _time_left(self, at_least: float = 1.0) -> float:
        """What a step may take: the rest of the run's time, or (per step, once ready) test.timeout."""
        if self.timeout_per_step and self._ready:
            return self.timeout_s
        return max(at_least, self.deadline.left())

    def say(self, message: str, *args: Any) -> None:
        """A log line of this VM, prefixed with its run index when several run at once."""
        log.info((f"{self.output_prefix} " if self.output_prefix else "") + message, *args)

    def _wait(self, stage: str, check: Callable[[], bool], poll_s: float = 1.0) -> None:
        """Poll ``check()`` until it is true; fail naming the stage when the guest exits or time runs out."""
        vm = self.vm
        assert vm is not None
        step = stage.split(":")[0]
        while True:
            if vm.proc is not None and vm.proc.poll() is not None:
                err = vm.failure(f"the guest stopped (QEMU exit {vm.proc.returncode}) while waiting for: {stage}")
                raise MachineryError.from_error(step, err)
            if check():
                return
            if self.deadline.left() <= 0:
                err = vm.failure(f"'{stage.split(': ', 1)[-1]}' did not happen within test.timeout "
                                 f"({self.deadline.total:.0f} s)",
                                 hint=f"raise test.timeout, or look at the serial log: {vm.spec.serial_log}")
                raise MachineryError.from_error(step, err)
            time.sleep(poll_s)

    def _ssh_ok(self, command: str, timeout: float) -> bool:
        assert self.files is not None
        argv = ssh_argv(self.files, self.ssh_port, self.user, command, connect_timeout=5)
        try:
            result = run(argv, stage="test-image", timeout=timeout, check=False)
        except CommandTimeoutError:
            return False
        if result.returncode == 255 and "Host key verification failed" in result.stderr:
            raise host_key_changed()
        return result.returncode == 0

    def _prepare_guest(self) -> None:
        """The working folder (owned by the run user) and the command's environment file, in one trip."""
        workdir = remote_path(self.pipeline.test.workdir)
        make = (f"{{ mkdir -p {workdir} 2>/dev/null || sudo -n install -d -o \"$(id -un)\" -g \"$(id -gn)\" "
                f"{workdir}; }} && test -w {workdir} || {{ echo 'cannot create {self.pipeline.test.workdir}' >&2; "
                "exit 3; }; ")
        env = {**dict(self.pipeline.test.env),
               "CLOUDBAKE_WORKDIR": self.pipeline.test.workdir,
               **{f"CLOUDBAKE_PORT_{f.guest}": str(f.host) for f in self.forwards},
               **self.extra_env}
        self._write_env(env, name="env", before=make)

    def _write_env(self, env: dict[str, str], name: str, before: str = "") -> None:
        """A shell file of exports, readable by the run user only: values never appear on a command line."""
        text = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))
        write = (f"{before}umask 077 && mkdir -p {remote_path(GUEST_STATE)} && "
                 f"cat > {remote_path(GUEST_STATE + '/' + name)}")
        result = run(self.ssh_argv(write), stage="test-image", timeout=self._time_left(5.0), check=False,
                     input=text.encode())
        if result.returncode == 3 and before:
            raise MachineryError("workdir", f"cannot create test.workdir {self.pipeline.test.workdir} in the guest:\n"
                                            f"{tail(result.stderr)}")
        if result.returncode != 0:
            raise MachineryError("env", f"cannot write the command's environment in the guest:\n{tail(result.stderr)}")

    def _command_script(self, command: str, *, extra_env: bool) -> str:
        """The user's command in a subshell, so its own ``exit`` still records the status."""
        state = remote_path(GUEST_STATE)
        sources = f". {state}/env" + (f" && . {state}/env.{self._status_nonce}" if extra_env else "")
        return (f"cd {remote_path(self.pipeline.test.workdir)} && {sources} || exit 255\n"
                f"(\n{command}\n)\n"
                f"s=$?; printf %s \"$s\" > {state}/status.{self._status_nonce}; exit \"$s\"")

    def _status_after_disconnect(self, stderr: str) -> int:
        """SSH exits 255 for its own failures and for a command that exited 255: the recorded status decides."""
        if "Host key verification failed" in stderr:
            raise host_key_changed()
        state = remote_path(GUEST_STATE)
        try:
            result = run(self.ssh_argv(f"cat {state}/status.{self._status_nonce}"), stage="test-image", timeout=30,
                         check=False)
        except CommandTimeoutError:
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip().isdigit():
            return int(result.stdout.strip())
        raise MachineryError("ssh", f"the SSH connection to the guest broke while the command ran:\n{tail(stderr)}",
                             hint=f"the guest may have crashed or powered off; serial log: {self.serial_log}")

    def _run_prefixed(self, script: str, timeout: float) -> int:
        """Stream the command's output line by line, each line prefixed (``-j``: many runs share a terminal)."""
        with spawn(self.ssh_argv(script), stage="test-image", stdout=subprocess.PIPE,
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

    def _boot(self, manifest: Manifest) -> tuple[VmRun, int]:
        """Boot with free forwarded ports; another run grabbing one in between means a retry.

        The VM's context joins this machine's stack, so ``close`` stops it whatever happens.
        """
        assert self.files is not None
        host = detect_host()
        choice = resolve_accel(self.pipeline.vm.accel, self.pipeline.source.arch, host, self.paths.cache_dir)
        fixed_ports = any(f.host for f in self.pipeline.test.forward)
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            self.forwards = resolve_forwards(self.pipeline.test.forward)
            spec = dataclasses.replace(vm_spec(self.pipeline, self.paths, manifest, self.files, port, self.forwards,
                                               host, choice.accel, key_channel=self.key_channel),
                                       interactive=self.interactive)
            booting = contextlib.ExitStack()
            try:
                vm, _ = booting.enter_context(boot_with_fallback(spec, choice, self.paths.cache_dir, "test-image"))
            except PipelineError as err:
                booting.close()
                raise MachineryError.from_error("boot", err) from None
            time.sleep(0.5)
            if vm.proc is not None and vm.proc.poll() is not None and "hostfwd" in vm.qemu_stderr():
                stderr = vm.qemu_stderr()
                booting.close()
                if attempt + 1 < PORT_ATTEMPTS and not fixed_ports:
                    log.info("a port was taken before QEMU could bind it; trying others")
                    continue
                raise MachineryError("boot", f"QEMU could not forward a port:\n{stderr}",
                                     hint="another program holds a host port named in test.forward")
            self._stack.enter_context(booting)
            return vm, port
        raise MachineryError("boot", "could not bind a forwarded SSH port on 127.0.0.1")


def _pump(stream: IO[bytes] | None, out: Any, prefix: str | None) -> None:
    assert stream is not None
    for line in iter(stream.readline, b""):
        out.write(f"{prefix} {line.decode(errors='replace').rstrip(chr(10))}\n")
        out.flush()


# Lists the matches of each pattern (NUL-separated, relative to /) and archives them all in
# one tar stream, however many there are: tar reads the list itself, so nothing is split
# into several archives the way xargs would. An empty IFS keeps spaces in patterns while
# globs still expand.
ARTIFACTS_SCRIPT = ("IFS=''; "
                    'cd / && for p in "$@"; do for f in $p; do [ -e "$f" ] && printf "%s\\0" "${f#/}"; done; done '
                    '| tar --null --files-from=- -cf -')

