"""Warm start: test VMs resume from a saved state of a booted, ready VM instead of booting.

A warm set belongs to one baked image: the overlay W the saved VM ran on, its firmware
variables, its seed, the saved RAM and device state (migrated through QMP into a zstd
stream), the client key that logs in to it and its host key's public half. A test VM
restores from it with a new overlay on W and ``-incoming``; W is read-only from then on,
so any number of VMs restore from one set at once.

The set is named by everything the saved state depends on (warm_inputs); any change names
another set, so a restore never meets a state from another QEMU, machine, CPU, memory size,
accelerator or firmware. docs/testing-your-project.md lists the trade-offs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.core.errors import PipelineError
from cloudbake.core.files import (
    age_s,
    file_lock,
    is_verified,
    record_verified,
    remove_unheld_lock,
    sha256_file,
    write_atomically,
)
from cloudbake.core.log import stage_logger
from cloudbake.core.tools import require_tool
from cloudbake.image.qcow2 import overlay_backing
from cloudbake.image.store import Manifest
from cloudbake.qemu.argv import VmSpec, cpu_for, machine_for
from cloudbake.qemu.host import host_fingerprint
from cloudbake.qemu.vmrun import VmRun, qmp_command

log = stage_logger("warm")

# Bump when what a warm set holds, or how a restore uses it, changes.
# 2: no client key in the set; the run's key arrives over a virtio-serial port.
WARM_VERSION = 2
WARM_FOLDER = ".warm"
SAVE_TIMEOUT_S = 300.0
RESTORE_TIMEOUT_S = 120.0
# zstd's fastest levels compress a guest's RAM (mostly zero and page cache) 5-20x at
# hundreds of MB/s, faster than the disk would take the raw bytes.
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class WarmSet:
    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "disk.qcow2"

    @property
    def vars(self) -> Path:
        return self.folder / "efivars.fd"

    @property
    def seed(self) -> Path:
        return self.folder / "seed.iso"

    @property
    def state(self) -> Path:
        return self.folder / "state.zst"

    @property
    def meta(self) -> Path:
        return self.folder / "warm.json"

    def record(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())  # type: ignore[no-any-return]


# Accelerators whose guests run on the host CPU itself (-cpu host): a state saved under them
# restores only onto a CPU with the same features. TCG emulates its CPU model the same way
# on every host.
HOST_CPU_ACCELS = ("kvm", "hvf")


@functools.lru_cache(maxsize=8)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def firmware_digest(code: Path) -> str:
    """The firmware code by its bytes, not its path: runners install it at other times, and arm64's
    padded copy lives in each runner's own cache folder; the same bytes restore the same state."""
    stat = code.stat()
    return _digest_of(str(code), stat.st_size, stat.st_mtime_ns)


def warm_inputs(spec: VmSpec, qemu_version: str, image_key: str,
                host_cpu: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a saved state depends on: restoring it needs the same machine, byte for byte.

    Not here, because a restore may change them: the disk, seed, serial and socket paths
    (same contents, other names), the forwarded host ports. ``host_cpu`` (host_cpu_identity)
    counts under KVM and hvf only, where the guest's CPU is the host's.
    """
    code = spec.firmware_code
    return {
        "host_cpu": (host_cpu or {}).get("id") if spec.accel in HOST_CPU_ACCELS else None,
        "version": WARM_VERSION,
        "image": image_key,
        "qemu": qemu_version,
        "arch": str(spec.arch),
        "machine": machine_for(spec),
        "cpu": cpu_for(spec),
        "accel": spec.accel,
        "cpus": spec.cpus,
        "memory_mib": spec.memory_mib,
        "firmware": spec.firmware,
        "firmware_code": firmware_digest(code) if code else None,
        "extra_args": list(spec.extra_args),
    }


def image_identity(manifest: Manifest) -> str:
    """The image a state was saved from, by its bytes: the key, the SHA-256, a layer's parent's SHA-256.

    The key alone is not enough: a rebake under the same key (``--force``, ``-a``, a clean
    and a pull) writes other bytes, and a state saved on the old ones must never resume on
    the new. A layer's parent is named by its digest in the layer's manifest (verify_chain
    checks the chain before any run), so that digest covers the chain below it.
    """
    parent = manifest.document.get("parent") if isinstance(manifest.document.get("parent"), dict) else {}
    return ":".join([manifest.key, manifest.image_sha256 or "no-digest", str((parent or {}).get("sha256") or "")])


# --- the key hand-over: a set holds no secret that logs in to the saved VM ------------------
#
# Before the save, the VM the set is saved from starts a listener (a transient systemd unit,
# as root) on the virtio-serial port KEY_PORT_NAME and drops the key it was logged in with.
# A restored VM resumes inside that listener: the host connects to the port's socket and
# sends the time, this run's public key and some randomness, one line each; the listener sets
# the clock, adds the key, mixes the randomness into the pool and answers "ok". Only then
# can anyone log in, with this run's private key, which never leaves the run folder.

KEY_LISTENER = r"""
dev=""
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "{port}" ] && dev="/dev/${{p##*/}}"
done
[ -n "$dev" ] || exit 1
# Until a host connects, a read of the port ends at once (no data, host not connected).
while :; do
    if exec 3<>"$dev"; then
        if IFS= read -r now <&3 && IFS= read -r key <&3 && IFS= read -r seed <&3; then break; fi
        exec 3<&-
    fi
    sleep 0.2
done
date -u -s "@$now" >/dev/null
printf '%s' "$seed" > /dev/urandom
umask 077
# cloudbake's user, then the users whose empty key list asked for its keys.
for user in "$@"; do
    home=$(getent passwd "$user" | cut -d: -f6)
    [ -n "$home" ] || continue
    mkdir -p "$home/.ssh"
    printf '%s\n' "$key" >> "$home/.ssh/authorized_keys"
    chown "$user:" "$home/.ssh" "$home/.ssh/authorized_keys"
done
echo ok >&3
rm -f "$0"
"""
KEY_HANDOVER_TIMEOUT_S = 60.0
KEY_ANSWER_MAX_BYTES = 64


def arm_key_listener_script(users: list[str], saved_with: str) -> str:
    """The guest command (run over SSH as ``users[0]`` just before the save) that starts the listener and
    removes ``saved_with`` (the key the saving VM was logged in with) from every user's authorized keys.

    ``users``: cloudbake's user first, then the users whose empty key list asked for its keys
    (``seed.placeholder_users``): a resumed VM gives each of them the run's key."""
    from cloudbake.qemu.argv import KEY_PORT_NAME

    listener = KEY_LISTENER.format(port=KEY_PORT_NAME)
    # From a file, not `sh -c`: systemd expands $VARIABLES and %specifiers in a unit's command line.
    script = f"/run/cloudbake-key-{secrets.token_hex(4)}.sh"
    start = (f"printf '%s' {shlex.quote(listener)} | sudo -n tee {script} >/dev/null && "
             f"sudo -n systemd-run -q --unit={Path(script).stem} --collect /bin/sh {script} {shlex.join(users)}")
    # grep exits 1 when no other key is left: that is fine, the file is then empty.
    drop = (f"{{ grep -vxF {shlex.quote(saved_with)} ~/.ssh/authorized_keys || true; }} "
            "> ~/.ssh/authorized_keys.new && mv ~/.ssh/authorized_keys.new ~/.ssh/authorized_keys")
    for other in users[1:]:
        keys = f'"$(getent passwd {shlex.quote(other)} | cut -d: -f6)/.ssh/authorized_keys"'
        drop += (f"; if sudo -n test -f {keys}; then {{ sudo -n grep -vxF {shlex.quote(saved_with)} {keys} || true; }}"
                 f" | sudo -n tee {keys}.new >/dev/null && sudo -n mv {keys}.new {keys} && "
                 f"sudo -n chown {shlex.quote(other)}: {keys}; fi")
    return f"set -e; {start}; {drop}"


def hand_over_key(socket_path: Path, public_key: str, timeout_s: float = KEY_HANDOVER_TIMEOUT_S) -> None:
    """Send a resumed VM the time, this run's public key and randomness; wait for its "ok"."""
    import socket as sockets

    deadline = time.monotonic() + timeout_s
    message = f"{time.time():.6f}\n{public_key}\n{os.urandom(256).hex()}\n".encode()
    last = ""
    while time.monotonic() < deadline:
        try:
            with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as conn:
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                conn.connect(str(socket_path))
                conn.sendall(message)
                answer = bytearray()
                # One deadline for the whole hand-over and a small cap: a guest that trickles bytes
                # without a newline, or floods them, cannot hold the run (test.timeout has not started).
                while not answer.endswith(b"\n") and len(answer) <= KEY_ANSWER_MAX_BYTES:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("no answer in time")
                    conn.settimeout(left)
                    chunk = conn.recv(64)
                    if not chunk:
                        break
                    answer += chunk
            if answer.strip() == b"ok":
                return
            last = f"answered {bytes(answer[:40])!r}"
        except OSError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.2)
    raise PipelineError(f"the resumed VM did not take this run's key over its key port ({last})",
                        hint="the warm set may predate the key listener; it is rebuilt at the next run")


def warm_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def warm_root(base: Path) -> Path:
    return base.parent / WARM_FOLDER


def warm_set_for(base: Path, key: str) -> WarmSet:
    return WarmSet(warm_root(base) / f"{base.stem}-{key}")


def find_warm_set(base: Path, key: str) -> WarmSet | None:
    """The complete set for ``key`` (its record is written last), or None."""
    warm = warm_set_for(base, key)
    return warm if warm.meta.is_file() else None


def sets_of(base: Path) -> list[WarmSet]:
    """The complete warm sets of the image ``base``, whatever their key."""
    root = warm_root(base)
    if not root.is_dir():
        return []
    return [WarmSet(folder) for folder in sorted(root.glob(f"{base.stem}-*"))
            if folder.is_dir() and (folder / "warm.json").is_file()]


def saved_on_another_cpu(base: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a set of this image that differs from ``inputs`` only in the host CPU, or None.

    Such a state is never resumed here (under KVM or hvf the guest runs on the host's CPU and
    may use features this one lacks, and fail later): the caller says so in one line.
    """
    if inputs.get("host_cpu") is None:
        return None
    mine = {k: v for k, v in inputs.items() if k != "host_cpu"}
    for warm in sets_of(base):
        try:
            record = warm.record()
        except (OSError, ValueError):
            continue
        theirs = record.get("inputs") if isinstance(record, dict) else None
        if isinstance(theirs, dict) and theirs.get("host_cpu") not in (None, inputs["host_cpu"]) and \
                {k: v for k, v in theirs.items() if k != "host_cpu"} == mine:
            return record
    return None


# --- digests: a set may come from a cache; it is checked once before its first use --------

WARM_FILES = ("disk.qcow2", "efivars.fd", "seed.iso", "state.zst")


def set_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each file a restore reads (recorded in warm.json when the set is made)."""
    return {name: sha256_file(folder / name) for name in WARM_FILES if (folder / name).is_file()}


# The saved VM's host key as known_hosts takes it: one line, the key type cloudbake makes, an optional comment.
HOST_KEY_LINE = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]{20,200}={0,2}( [\x21-\x7e][\x20-\x7e]{0,200})?")


def verify_set(warm: WarmSet, base: Path) -> None:
    """The set's files match the digests its record holds (hashed once, then remembered per file),
    and its disk names no file but ``base`` (a set may come from a cache or a registry)."""
    from cloudbake.image.qcow2 import check_standalone

    check_standalone(warm.disk, "a warm set's disk", allowed_backing=overlay_backing(base, warm.folder))
    record = warm.record()
    recorded = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(recorded, dict) or set(recorded) != {n for n in WARM_FILES if (warm.folder / n).exists()}:
        raise PipelineError(f"{warm.folder.name}: its record names no digest for every file it holds")
    # What reaches QEMU comes from the inputs the set is named by (its key), nothing else of the record.
    inputs = record.get("inputs")
    if not isinstance(inputs, dict) or warm.folder.name != f"{base.stem}-{warm_key(inputs)}":
        raise PipelineError(f"{warm.folder.name}: its record's inputs are not the ones the set is named by")
    if not isinstance(record.get("host_public"), str) or not HOST_KEY_LINE.fullmatch(record["host_public"]):
        raise PipelineError(f"{warm.folder.name}: its record's host key is not one OpenSSH ed25519 public key")
    for name, digest in recorded.items():
        path = warm.folder / name
        if not isinstance(digest, str) or path.is_symlink():
            raise PipelineError(f"{warm.folder.name}/{name}: not a file with a recorded digest")
        if is_verified(path, digest):
            continue
        actual = sha256_file(path)
        if actual != digest:
            raise PipelineError(f"{warm.folder.name}/{name} does not match the SHA-256 its record holds "
                                f"(a corrupted or altered copy)")
        record_verified(path, digest)


# --- a save that failed is remembered, so later runs do not boot twice for nothing ---------

FAILED_SAVE_RETRY_S = 24 * 3600


def failed_save_marker(base: Path, key: str) -> Path:
    return warm_root(base) / f".{base.stem}-{key}.failed"


def remember_failed_save(base: Path, key: str, reason: str, missing: tuple[str, ...] = ()) -> None:
    """Remember that saving failed on this host; ``missing``: the host programs whose lack made it fail."""
    record = {"reason": reason[:500], "time": time.time(), "host": host_fingerprint(), "missing": list(missing)}
    try:   # best effort: on the full disk that made the save fail, the next run simply tries again
        warm_root(base).mkdir(parents=True, exist_ok=True)
        write_atomically(failed_save_marker(base, key), json.dumps(record).encode())
    except OSError as err:
        log.warning("could not remember the failed save (%s)", err.strerror or err)


def failed_save(base: Path, key: str) -> str | None:
    """Why saving this set failed on this host within the last day, while that reason still holds; else None
    (then a run may try to save it). A marker from another machine (a restored CI cache) or one whose
    missing program is now installed does not count."""
    marker = failed_save_marker(base, key)
    try:
        record = json.loads(marker.read_text())
        if record.get("host") != host_fingerprint():
            return None
        if any(shutil.which(str(tool)) for tool in record.get("missing", [])):
            return None
        if age_s(float(record["time"])) < FAILED_SAVE_RETRY_S:
            return str(record.get("reason") or "unknown")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def discard(warm: WarmSet, reason: str) -> None:
    log.warning("the warm start of %s failed (%s); its warm set is removed and rebuilt at the next run; "
                "this run boots cold", warm.folder.name, reason)
    _remove(warm.folder)


def _remove(folder: Path) -> None:
    with contextlib.suppress(OSError):
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                path.chmod(0o600)
    shutil.rmtree(folder, ignore_errors=True)


def sweep_orphans(base: Path) -> None:
    """Warm sets of images that are gone (pruned) and half-built sets of dead builders."""
    root = warm_root(base)
    if not root.is_dir():
        return
    images = {p.stem for p in base.parent.glob("*.qcow2")}
    for folder in root.iterdir():
        try:
            old = age_s(folder.stat().st_mtime) > 3600
        except OSError:
            continue
        if folder.name.endswith(".lock"):   # a builder's lock: never one that is held, however old
            if old:
                remove_unheld_lock(folder)
            continue
        if folder.name.endswith(".failed"):   # a failed save is remembered until it is no longer valid
            if _marker_expired(folder):
                folder.unlink(missing_ok=True)
            continue
        if folder.name.startswith("."):  # a set being built: only a dead builder's old ones
            if old:
                folder.unlink() if folder.is_file() else _remove(folder)
            continue
        complete = (folder / "warm.json").is_file()
        if folder.name.rsplit("-", 1)[0] not in images or (not complete and old):
            _remove(folder)


def _marker_expired(marker: Path) -> bool:
    try:
        return age_s(float(json.loads(marker.read_text())["time"])) >= FAILED_SAVE_RETRY_S
    except (OSError, ValueError, KeyError, TypeError):
        return True


def build_lock(base: Path, key: str) -> Any:
    """One builder per warm set; others wait and then use what it built."""
    root = warm_root(base)
    root.mkdir(parents=True, exist_ok=True)
    return file_lock(root / f".{base.stem}-{key}.lock", f"the warm set of {base.name}")


def save_state(vm: VmRun, state: Path, timeout_s: float = SAVE_TIMEOUT_S) -> float:
    """Stop the guest's CPUs and migrate its RAM and devices into ``state`` (zstd), then quit QEMU.

    Returns the seconds the save took. The source is stopped first, so the state is one
    consistent moment and the destination comes up paused.
    """
    zstd = require_tool("zstd")
    socket = vm.spec.qmp_socket
    partial = state.with_name(f".{state.name}.tmp")
    started = time.monotonic()
    qmp_command(socket, "stop")
    uri = f"exec:{shlex.quote(zstd)} -q -{ZSTD_LEVEL} -T0 -c > {shlex.quote(str(partial))}"
    qmp_command(socket, "migrate", args={"uri": uri})
    while True:
        status = qmp_command(socket, "query-migrate").get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            raise PipelineError(f"saving the VM's state failed (migration {status})",
                                hint=f"QEMU said: {vm.qemu_stderr() or 'nothing'}")
        if time.monotonic() - started > timeout_s:
            raise PipelineError(f"saving the VM's state did not finish within {timeout_s:.0f} s")
        time.sleep(0.2)
    with contextlib.suppress(Exception):
        qmp_command(socket, "quit", timeout=5.0)
    if vm.proc is not None:
        vm.proc.wait(30)
    os.replace(partial, state)
    return time.monotonic() - started


def incoming_uri(state: Path) -> str:
    zstd = require_tool("zstd")
    return f"exec:{shlex.quote(zstd)} -q -d -c {shlex.quote(str(state))}"


def wait_restored(vm: VmRun, timeout_s: float = RESTORE_TIMEOUT_S) -> float:
    """Wait for the incoming state to load, then resume the CPUs; returns the seconds it took."""
    started = time.monotonic()
    while True:
        if vm.proc is not None and vm.proc.poll() is not None:
            raise PipelineError(f"QEMU exited while loading the saved state (exit {vm.proc.returncode}):\n"
                                f"{vm.qemu_stderr()}")
        with contextlib.suppress(Exception):
            status = qmp_command(vm.spec.qmp_socket, "query-status", timeout=2.0).get("status")
            if status in ("paused", "postmigrate"):
                qmp_command(vm.spec.qmp_socket, "cont")
                return time.monotonic() - started
            if status == "running":
                return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise PipelineError(f"the saved state did not load within {timeout_s:.0f} s")
        time.sleep(0.1)


def keep_as_warm_set(warm: WarmSet, overlay: Path, vars_file: Path | None, seed: Path, state: Path,
                     record: dict[str, Any]) -> None:
    """Move a saved VM's files into the set, read-only, and write its record last (that completes it).

    The set holds no secret: no client key (the run's key is handed over through the key
    port), and in place of the run's seed (which carried the saved VM's private host key) a
    blank of the same size, so a restore has the same devices. The guest read the seed at its
    first boot and never again.
    """
    partial = warm.folder.with_name(f".{warm.folder.name}.partial")
    _remove(partial)
    partial.mkdir(parents=True, mode=0o700)
    moves = [(overlay, "disk.qcow2"), (state, "state.zst")]
    if vars_file is not None:
        moves.append((vars_file, "efivars.fd"))
    for source, name in moves:
        shutil.move(source, partial / name)
    with open(partial / "seed.iso", "wb") as blank:
        blank.truncate(seed.stat().st_size)
    seed.unlink()
    for path in partial.iterdir():
        path.chmod(0o444)
    record = {**record, "sha256": set_digests(partial)}
    for name, digest in record["sha256"].items():
        record_verified(partial / name, digest)
    write_atomically(partial / "warm.json", json.dumps(record, indent=2).encode(), mode=0o644)
    _remove(warm.folder)
    os.replace(partial, warm.folder)
