"""Run folders: one per test VM beside the base image, what it holds (overlay, key pair, pinned host
key, seed, firmware vars, the ``run.json`` record), listing, stopping and sweeping them, and
the plan of one VM (``RunPlan``) from which its QEMU spec is made.

The base image is only ever read: every run writes its own overlay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.config.model import Forward, Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.files import write_atomically
from cloudbake.core.log import stage_logger
from cloudbake.core.runner import run
from cloudbake.core.tools import require_tool
from cloudbake.image.build import resolve_key
from cloudbake.image.qcow2 import overlay_backing
from cloudbake.image.seed import (
    SUDO_NOPASSWD,
    SeedFiles,
    build_seed_iso,
    placeholder_users,
    render_cloud_config,
    render_meta_data,
)
from cloudbake.image.store import Manifest, published_image, verify_chain
from cloudbake.qemu.argv import VmSpec, machine_shape
from cloudbake.qemu.firmware import with_uefi
from cloudbake.qemu.host import Host, detect_host, resolve_accel
from cloudbake.qemu.vmrun import VmRun, boot_with_fallback, qmp_command

log = stage_logger("vm")
PORT_ATTEMPTS = 3

RUNS_FOLDER = ".runs"


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

    def record_vm(self, vm: VmRun, ssh_port: int, forwards: tuple[Forward, ...]) -> None:
        """The running VM in the record: ``ps`` shows its ports, ``down`` and the sweep stop that very QEMU."""
        pid = vm.proc.pid if vm.proc else 0
        self.update_record(ssh_port=ssh_port, forwards={f.guest: f.host for f in forwards},
                           qemu_pid=pid, qemu_started=process_start_marker(pid) if pid else None)



# --- run folders, leftovers and the VMs that are up ---------------------------------------


def runs_root(base: Path) -> Path:
    """Runs live beside the base image, so overlays can name it by a relative path."""
    return base.parent / RUNS_FOLDER


# What ``cloudbake up --name`` accepts: a file name on every host, and a word in a shell.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")


def new_run(base: Path, name: str | None = None) -> RunFiles:
    """A new run folder (0700), named ``name`` or 8 random hex digits: short ids, as docker's and limactl's,
    that a unique prefix of also names (``cloudbake ssh 3f``)."""
    root = runs_root(base)
    root.mkdir(parents=True, exist_ok=True)
    if name is not None and not RUN_NAME.fullmatch(name):
        raise PipelineError(f"a VM name is 1-40 letters, digits, '-' or '_', starting with a letter or digit: {name!r}")
    folder = root / (name or secrets.token_hex(4))
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        raise PipelineError(f"a VM named {folder.name!r} exists already",
                            hint="cloudbake ps lists them; cloudbake down NAME stops it") from None
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
    return pid_alive(pid) and process_start_marker(pid) == info.get("qemu_started")


def process_start_marker(pid: int) -> str | None:
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
    qemu_img = require_tool("qemu-img")
    backing = overlay_backing(base, overlay.parent)
    run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay], stage="test-image",
        timeout=60)



# --- ports --------------------------------------------------------------------------------


def is_port_clash(err: Exception | str) -> bool:
    """QEMU could not listen on a forwarded port (another program took it after free_port chose it);
    ``err`` is the error, or QEMU's stderr."""
    text = str(err).lower()
    return "host forwarding rule" in text or ("hostfwd" in text and "in use" in text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_forwards(forwards: Sequence[Forward]) -> tuple[Forward, ...]:
    """Pick free host ports for the forwards that asked for any port."""
    return tuple(Forward(f.host or free_port(), f.guest) for f in forwards)



# --- what one VM is made of -----------------------------------------------------------------


def current_base(pipeline: Pipeline, paths: Paths) -> tuple[Path, Manifest]:
    """The published image for the current key and its manifest, checked against its digest."""
    key, _, _, _ = resolve_key(pipeline, paths)
    base = published_image(paths, pipeline.name, key)
    if not base.is_file():
        raise PipelineError(f"no baked image for the current key ({base.name})",
                            hint="run cloudbake bake first")
    return base, verify_chain(base)



@dataclass(frozen=True)
class RunPlan:
    """One test VM before it boots: the pipeline, the verified base image and its manifest, the run folder."""

    pipeline: Pipeline
    paths: Paths
    base: Path
    manifest: Manifest
    files: RunFiles
    label: str

    def spec(self, ssh_port: int, forwards: tuple[Forward, ...], host: Host, accel: str, *,
             key_channel: bool = False) -> VmSpec:
        """The VM's spec; ``key_channel``: the warm start's key port (the saving VM and every restore)."""
        pipeline, files, firmware = self.pipeline, self.files, self.manifest.firmware
        spec = dataclasses.replace(machine_shape(pipeline, accel, firmware), disk=files.overlay,
                                   serial_log=files.serial_log, qmp_socket=files.qmp_socket, seed=files.seed,
                                   ssh_port=ssh_port, forwards=tuple((f.host, f.guest) for f in forwards),
                                   key_channel=files.key_socket if key_channel else None)
        return with_uefi(spec, host, self.paths.cache_dir, files.vars) if firmware == "uefi" else spec

    def record_owner(self, **fields: Any) -> None:
        """The run's record, written before anything else of the run, so ``ps`` and the sweep know its owner."""
        write_atomically(self.files.owner, json.dumps({"pid": os.getpid(), "base": self.base.name,
                                                       "label": self.label, "user": self.pipeline.cloud_init.user,
                                                       **fields}).encode(), mode=0o600)


# --- keys and the seed --------------------------------------------------------------------


def make_keypair(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair; the private key is 0600. Returns the public key text."""
    keygen = require_tool("ssh-keygen")
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], stage="test-image", timeout=30)
    os.chmod(path, 0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def run_seed_files(pipeline: Pipeline, client_public: str, host_private: str, host_public: str,
                   instance_id: str) -> SeedFiles:
    """The per-run seed: this run's login key and a pre-generated host key, nothing else re-applied."""
    user_data = {
        "users": [{"name": pipeline.cloud_init.user, "sudo": SUDO_NOPASSWD, "shell": "/bin/bash",
                   "lock_passwd": True, "ssh_authorized_keys": [client_public]},
                  # Users whose empty key list in the user-data asked for cloudbake's keys get this run's too.
                  *({"name": other, "ssh_authorized_keys": [client_public]} for other in placeholder_users(pipeline))],
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_keys": {"ed25519_private": host_private, "ed25519_public": host_public},
        "ssh_genkeytypes": [],
    }
    return SeedFiles(render_cloud_config(user_data), render_meta_data(instance_id, pipeline.cloud_init.hostname))



def prepare_run(plan: RunPlan) -> str:
    """Owner record, overlay, this run's key pair and host key, and its seed; returns the host's public key."""
    files, label = plan.files, plan.label
    plan.record_owner()
    make_overlay(plan.base, files.overlay)
    client_public = make_keypair(files.client_key, f"cloudbake-{label}-{files.id}")
    host_public = make_keypair(files.host_key, f"cloudbake-{label}-host")
    seed = run_seed_files(plan.pipeline, client_public, files.host_key.read_text(), host_public,
                          f"cloudbake-{label}-{secrets.token_hex(8)}")
    build_seed_iso(seed, files.seed)
    os.chmod(files.seed, 0o600)  # it carries the private host key
    files.host_key.unlink()  # the guest has it now; the host only needs the public half
    return host_public


def reset_run_folder(files: RunFiles) -> None:
    """Back to a fresh run folder (the record kept) for a cold boot after a failed warm start."""
    for path in files.folder.iterdir():
        if path != files.owner:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@dataclass
class Booted:
    """A test VM booting, its forwarded ports bound; ``stack`` stops it."""

    vm: VmRun
    port: int
    forwards: tuple[Forward, ...]
    stack: contextlib.ExitStack


def boot_on_free_ports(plan: RunPlan, *, key_channel: bool, interactive: bool) -> Booted:
    """Boot ``plan`` with free forwarded ports; another program grabbing one in between means a retry."""
    pipeline = plan.pipeline
    host = detect_host()
    choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, host, plan.paths.cache_dir)
    fixed_ports = any(f.host for f in pipeline.test.forward)
    for attempt in range(PORT_ATTEMPTS):
        port, forwards = free_port(), resolve_forwards(pipeline.test.forward)
        spec = dataclasses.replace(plan.spec(port, forwards, host, choice.accel, key_channel=key_channel),
                                   interactive=interactive)
        booting = contextlib.ExitStack()
        try:
            vm, _ = booting.enter_context(boot_with_fallback(spec, choice, plan.paths.cache_dir, plan.label))
        except PipelineError as err:
            booting.close()
            raise MachineryError.from_error("boot", err) from None
        time.sleep(0.5)
        if vm.proc is not None and vm.proc.poll() is not None and is_port_clash(vm.qemu_stderr()):
            stderr = vm.qemu_stderr()
            booting.close()
            if attempt + 1 < PORT_ATTEMPTS and not fixed_ports:
                log.info("a port was taken before QEMU could bind it; trying others")
                continue
            raise MachineryError("boot", f"QEMU could not forward a port:\n{stderr}",
                                 hint="another program holds a host port named in test.forward")
        return Booted(vm, port, forwards, booting)
    raise MachineryError("boot", "could not bind a forwarded SSH port on 127.0.0.1")
