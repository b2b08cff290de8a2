"""Warm start of test VMs: which warm set a VM of the published image resumes from on this host,
saving one when there is none (one cold boot and a save), and resuming a run from it.

The warm set's own format, its checks and the save/restore over QMP are ``warm``'s; this
module decides and drives them for a run. Warm start is an optimization: whatever fails here
is said in one line and the run boots cold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.config.model import Forward, Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.progress import waiting
from cloudbake.core.runner import run, tail
from cloudbake.core.tools import ToolMissingError
from cloudbake.core.units import human_bytes
from cloudbake.image.seed import placeholder_users
from cloudbake.image.store import Manifest
from cloudbake.qemu.argv import machine_shape
from cloudbake.qemu.firmware import find_uefi, pflash_code
from cloudbake.qemu.host import detect_host, host_cpu_identity, qemu_binary, qemu_version, resolve_accel
from cloudbake.qemu.vmrun import VmRun
from cloudbake.run.runs import (
    PORT_ATTEMPTS,
    RunPlan,
    current_base,
    free_port,
    is_port_clash,
    make_keypair,
    make_overlay,
    reset_run_folder,
    resolve_forwards,
)
from cloudbake.run.warm import (
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

log = stage_logger("warm")


def warm_inputs_for_key(pipeline: Pipeline, paths: Paths, manifest: Manifest, accel: str,
                        version: str) -> dict[str, Any]:
    """What a warm set of this pipeline's VM depends on (no files touched).

    The test VM's shape (``machine_shape``, as RunPlan.spec uses it), so the set saved from a real VM is found.
    """
    spec = dataclasses.replace(machine_shape(pipeline, accel, manifest.firmware), key_channel=Path("key.sock"))
    if manifest.firmware == "uefi":
        firmware = find_uefi(pipeline.source.arch, detect_host())
        spec = dataclasses.replace(spec, firmware_code=pflash_code(firmware, pipeline.source.arch, paths.cache_dir))
    return warm_inputs(spec, version, image_identity(manifest), host_cpu_identity())


def resolve_warm_key(pipeline: Pipeline, paths: Paths, manifest: Manifest, accel: str, version: str) -> str:
    """The key of the warm set a VM of this pipeline would restore from (no files touched)."""
    return warm_key(warm_inputs_for_key(pipeline, paths, manifest, accel, version))


def host_warm_inputs(pipeline: Pipeline, paths: Paths, manifest: Manifest) -> tuple[dict[str, Any], str]:
    """What a warm set of this image depends on here (this host's accelerator and QEMU), and the QEMU version."""
    choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, detect_host(), paths.cache_dir)
    version = qemu_version(qemu_binary(pipeline.source.arch))
    return warm_inputs_for_key(pipeline, paths, manifest, choice.accel, version), version


def current_warm_set(pipeline: Pipeline, paths: Paths) -> WarmSet | None:
    """The warm set this host's test VMs of the published image would resume from, if it is saved."""
    base, manifest = current_base(pipeline, paths)
    return find_warm_set(base, warm_key(host_warm_inputs(pipeline, paths, manifest)[0]))


def choose_warm_set(pipeline: Pipeline, paths: Paths, base: Path, manifest: Manifest,
                    save: Callable[[str], WarmSet]) -> WarmSet | None:
    """The warm set of this image and QEMU setup; ``save(qemu_version)`` makes it now when it is missing.

    A save that fails is reported and remembered on this host (for a day, or until the missing program
    that made it fail is installed), and the run boots cold.
    """
    sweep_orphans(base)
    inputs, version = host_warm_inputs(pipeline, paths, manifest)
    key = warm_key(inputs)
    found = find_warm_set(base, key)
    if found is not None:
        return found
    other = saved_on_another_cpu(base, inputs)
    if other is not None:
        log.warning("the warm state of %s was saved on another CPU (%s); this host's CPU (%s) may lack its "
                    "features, so it is not resumed here; this run boots cold", base.name,
                    other.get("host_cpu_model", "unknown"), host_cpu_identity()["model"])
    failed = failed_save(base, key)
    if failed is not None:
        log.info("not saving a warm state of %s: saving one failed within the last day (%s); this run boots "
                 "cold (delete %s to try again)", base.name, failed, failed_save_marker(base, key))
        return None
    with build_lock(base, key):
        found = find_warm_set(base, key)
        if found is not None:
            return found
        try:
            return save(version)
        except MachineryError:
            raise
        except ToolMissingError as err:
            log.warning("could not save a warm state of %s (%s; %s); this run boots cold, and the next run after "
                        "it is installed saves one", base.name, err.message, err.hint)
            remember_failed_save(base, key, err.message, missing=(err.tool,))
            return None
        except (PipelineError, OSError) as err:   # OSError: a full disk, the state or the record
            reason = err.message if isinstance(err, PipelineError) else f"{err.strerror or err}"
            log.warning("could not save a warm state of %s (%s); this run boots cold, and later runs on this host "
                        "do not try again for a day", base.name, reason)
            remember_failed_save(base, key, reason.splitlines()[0])
            return None


def save_warm_set(plan: RunPlan, vm: VmRun, ssh: Callable[[str], list[str]], version: str) -> WarmSet:
    """Save a warm set from ``vm``, a VM of ``plan`` booted with the key port and logged into over ``ssh``.

    The guest's key listener is armed first, so a resumed VM takes the key of its own run.
    """
    spec, files = vm.spec, plan.files
    inputs = warm_inputs(spec, version, image_identity(plan.manifest), host_cpu_identity())
    warm = warm_set_for(plan.base, warm_key(inputs))
    saved_with = files.client_key.with_name("id_ed25519.pub").read_text().strip()
    user = plan.pipeline.cloud_init.user
    armed = run(ssh(arm_key_listener_script([user, *placeholder_users(plan.pipeline)], saved_with)),
                stage="warm", timeout=60, check=False)
    if armed.returncode != 0:
        raise PipelineError(f"could not start the key listener in the VM to save (exit status "
                            f"{armed.returncode}): {tail(armed.stderr) or 'no output'}")
    state = files.folder / "state.zst"
    with waiting(log, f"saving the warm state of {plan.base.name} (the guest's memory, zstd)"):
        save_s = save_state(vm, state)
    host_public = files.known_hosts.read_text().split(" ", 1)[1].strip()
    record: dict[str, Any] = {
        "inputs": inputs, "accel": spec.accel, "host_public": host_public, "saved_with": saved_with,
        "host_cpu_model": host_cpu_identity()["model"], "user": user,
        "state_bytes": state.stat().st_size, "memory_bytes": spec.memory_mib << 20,
        "save_s": round(save_s, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    keep_as_warm_set(warm, files.overlay, spec.firmware_vars, files.seed, state, record)
    log.info("saved the warm state of %s: %s (guest RAM %s) in %.1f s", plan.base.name,
             human_bytes(record["state_bytes"]), human_bytes(record["memory_bytes"]), save_s)
    return warm


@dataclass
class Resumed:
    """A VM resumed from a warm set, its run's key handed over; ``stack`` stops it."""

    vm: VmRun
    port: int
    forwards: tuple[Forward, ...]
    stack: contextlib.ExitStack
    load_s: float


def resume(plan: RunPlan, warm: WarmSet, *, interactive: bool) -> Resumed | None:
    """Resume a new overlay of the warm disk from the saved state; None when that fails (then boot cold).

    The set is checked against its recorded digests first (it may have come from a cache).
    A failure of the set itself discards it; a port taken meanwhile by another program is
    tried again on other ports and never costs the shared set.
    """
    files = plan.files
    try:
        verify_set(warm, plan.base)
        record = warm.record()
        plan.record_owner(warm=True)
        make_overlay(warm.disk, files.overlay)
        client_public = make_keypair(files.client_key, f"cloudbake-{plan.label}-{files.id}")
    except (PipelineError, OSError, ValueError, KeyError) as err:
        give_up(plan, warm, err)
        return None
    for attempt in range(PORT_ATTEMPTS):
        booting = contextlib.ExitStack()
        try:
            port, forwards = free_port(), resolve_forwards(plan.pipeline.test.forward)
            spec = plan.spec(port, forwards, detect_host(), record["inputs"]["accel"], key_channel=True)
            if spec.firmware_vars is not None:
                shutil.copyfile(warm.vars, spec.firmware_vars)
            spec = dataclasses.replace(spec, seed=warm.seed, incoming=incoming_uri(warm.state),
                                       interactive=interactive)
            vm = booting.enter_context(VmRun(spec, qemu_binary(spec.arch), plan.label))
            load_s = wait_restored(vm)
            files.known_hosts.write_text(f"[127.0.0.1]:{port} {record['host_public']}\n")
            assert vm.spec.key_channel is not None
            hand_over_key(vm.spec.key_channel, client_public)
        except (PipelineError, OSError, ValueError, KeyError) as err:
            booting.close()
            if is_port_clash(err) and attempt + 1 < PORT_ATTEMPTS:
                log.info("a forwarded port was taken meanwhile; resuming again on other ports")
                continue
            if is_port_clash(err):
                log.warning("the forwarded ports kept being taken; this run boots cold (the warm set is kept)")
                reset_run_folder(files)
                return None
            give_up(plan, warm, err)
            return None
        return Resumed(vm, port, forwards, booting, load_s)
    return None


def give_up(plan: RunPlan, warm: WarmSet, err: Exception) -> None:
    """The set failed this run: discarded (later runs save a new one), the run folder reset for a cold boot."""
    discard(warm, str(err).splitlines()[0] if str(err) else type(err).__name__)
    reset_run_folder(plan.files)
