"""bake: boot the upstream image once with the seed, check cloud-init's verdict, publish into the image store.

The build (cloudbake.image.build) says what the image is and its key; the store (cloudbake.image.store)
names, publishes and checks it. The published ``<output.dir>/<name>-<key>.qcow2`` is the proof
that a bake happened, so a restored CI cache skips the bake without doit's state.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cloudbake import __version__
from cloudbake.config.model import Firmware, Pipeline
from cloudbake.config.paths import Paths, resolve_paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import file_lock, sweep_temps
from cloudbake.core.log import stage_logger
from cloudbake.core.runner import run
from cloudbake.core.tools import require_tool
from cloudbake.core.units import format_size, human_bytes
from cloudbake.image.build import Build, resolve_build, resolve_key
from cloudbake.image.profile import PROFILE_MARKER, BootProfile, parse_boot_profile
from cloudbake.image.qcow2 import MAGIC as QCOW2_MAGIC
from cloudbake.image.qcow2 import check_standalone
from cloudbake.image.seed import (
    GENERALIZED_MARKER,
    RESULT_MARKER,
    SCHEMA_MARKER,
    STATUS_MARKER,
    build_seed_iso,
    with_boot_nonce,
)
from cloudbake.image.store import (
    Manifest,
    is_published,
    manifest_path,
    publish,
    published_image,
    qemu_img_info,
    read_manifest,
    verify_chain,
)
from cloudbake.qemu.argv import VmSpec, machine_shape
from cloudbake.qemu.firmware import resolve_firmware, with_uefi
from cloudbake.qemu.host import AccelChoice, detect_host, qemu_binary, qemu_version, resolve_accel
from cloudbake.qemu.vmrun import boot_with_fallback, serial_tail
from cloudbake.source.fetch import ensure_image

# A temp file this old belongs to no live writer (the slowest, publishing, rewrites its temp
# continuously; the others finish in milliseconds).
STALE_TEMP_S = 3600

log = stage_logger("bake")


# --- the key ------------------------------------------------------------------------------


# --- cloud-init's verdict -----------------------------------------------------------------


@dataclass(frozen=True)
class CloudInitResult:
    errors: list[str]
    recoverable: dict[str, list[str]]
    datasource: str | None
    generalized: bool
    guest_schema: str | None = None   # the guest's own `cloud-init schema --system --annotate` and status, if it warned
    profile: BootProfile | None = None   # which units and cloud-init stages cost the boot its time

    def failing_modules(self) -> list[str]:
        found = (re.match(r"\('([a-z0-9_-]+)',", error) for error in self.errors)
        return sorted({match.group(1).replace("-", "_") for match in found if match})


def redact_control(text: str) -> str:
    """Guest text as lines of plain text: escape sequences and control characters removed."""
    from cloudbake.core.progress import plain_text

    return "\n".join(plain_text(line) for line in text.splitlines())


def _marker_text(text: str, marker: str, nonce: str) -> str | None:
    found = re.findall(rf"{marker} {re.escape(nonce)} ([A-Za-z0-9+/=]*)", text)
    if not found:
        return None
    try:
        return base64.b64decode(found[-1]).decode("utf-8", errors="replace").strip()
    except ValueError:
        return None


def _marker_json(text: str, marker: str, nonce: str) -> dict[str, Any] | None:
    found = re.findall(rf"{marker} {re.escape(nonce)} ([A-Za-z0-9+/=]+)", text)
    if not found:
        return None
    try:
        data: dict[str, Any] = json.loads(base64.b64decode(found[-1]))
        return data
    except ValueError:
        return None


def parse_cloud_init_result(serial: str, nonce: str) -> CloudInitResult | None:
    """cloud-init's status and result, as this boot's finish script printed them on the console.

    Only lines carrying this boot's ``nonce`` count; None when there are none.
    """
    result = _marker_json(serial, RESULT_MARKER, nonce)
    status = _marker_json(serial, STATUS_MARKER, nonce)
    if result is None and status is None:
        return None
    errors: list[str] = list((result or {}).get("v1", {}).get("errors", []))
    recoverable: dict[str, list[str]] = {}
    for stage, info in ((status or {}).get("v1", {}) or {}).items():
        if isinstance(info, dict):
            errors += [e for e in info.get("errors", []) if e not in errors]
            for level, messages in (info.get("recoverable_errors") or {}).items():
                recoverable.setdefault(level, []).extend(f"{stage}: {m}" for m in messages)
    datasource = (result or {}).get("v1", {}).get("datasource")
    return CloudInitResult(errors, recoverable, datasource, f"{GENERALIZED_MARKER} {nonce}" in serial,
                           _marker_text(serial, SCHEMA_MARKER, nonce),
                           parse_boot_profile(_marker_text(serial, PROFILE_MARKER, nonce), status))


# --- the steps ----------------------------------------------------------------------------


class _Timer:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = round(time.monotonic() - start, 3)


UPSTREAM_FORMATS = ("qcow2", "raw")


def inspect_upstream(upstream: Path) -> dict[str, Any]:
    """qemu-img's view of the upstream image, refused unless it stands alone.

    A qcow2 can name other files: a backing file or an external data file would be
    read from the baker's disk and copied into the published image (a host file
    leaking into an image shared with others). The checksum only proves the bytes
    are upstream's, not that they are harmless.
    """
    with open(upstream, "rb") as f:
        is_qcow2 = f.read(4) == QCOW2_MAGIC
    if is_qcow2:   # before qemu-img opens it: a json:/nbd: backing or data file would be opened too
        check_standalone(upstream, "the upstream image", hint="upstream cloud images stand alone; check source.mirror")
    try:
        info = qemu_img_info(upstream)
    except PipelineError as err:
        raise PipelineError(f"{upstream.name}: qemu-img cannot read the upstream image ({err.message})",
                            hint="the file is not a disk image; check source.mirror") from None
    image_format = info.get("format")
    if image_format not in UPSTREAM_FORMATS:
        raise PipelineError(f"{upstream.name}: the upstream image is {image_format!r}, not qcow2 or raw; refused",
                            hint="Ubuntu's cloud images are qcow2; check source.mirror")
    if info.get("backing-filename"):
        raise PipelineError(f"{upstream.name}: the upstream image names a backing file "
                            f"({info['backing-filename']!r}); refused, it would copy a file from this machine into "
                            "the image", hint="upstream cloud images stand alone; check source.mirror")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if data_file:
        raise PipelineError(f"{upstream.name}: the upstream image keeps its data in an external file "
                            f"({data_file!r}); refused", hint="upstream cloud images stand alone; check source.mirror")
    return info


def make_work_disk(upstream: Path, dest: Path, pipeline: Pipeline) -> int:
    """A qcow2 overlay of the cached upstream image (never written), grown per disk.size; returns its size."""
    qemu_img = require_tool("qemu-img")
    info = inspect_upstream(upstream)
    current = int(info["virtual-size"])
    target = pipeline.disk.size.resolve(current)
    if target < current:
        raise PipelineError(f"disk.size {pipeline.disk.size} would shrink the image from {format_size(current)} "
                            f"to {format_size(target)}", hint=f"use +N growth or at least {format_size(current)}")
    dest.unlink(missing_ok=True)
    run([qemu_img, "create", "-q", "-f", "qcow2", "-F", info.get("format", "qcow2"), "-b", upstream.resolve(), dest,
         str(target)], stage="bake", timeout=60)
    log.info("work disk %s: overlay of %s, %s (was %s)", dest.name, upstream.name, human_bytes(target),
             human_bytes(current))
    return target


def make_layer_disk(parent_image: Path, parent_size: int, dest: Path, pipeline: Pipeline) -> int:
    """A qcow2 overlay of the parent's published image (never written); returns its size.

    disk.size counts only when the image sets it differently from its parent: an inherited
    ``+20G`` must not grow the disk once more per layer. ``+N`` then grows the parent's disk.
    """
    qemu_img = require_tool("qemu-img")
    assert pipeline.parent is not None
    target = parent_size
    if pipeline.disk.size != pipeline.parent.disk.size:
        target = pipeline.disk.size.resolve(parent_size)
    if target < parent_size:
        raise PipelineError(f"disk.size {pipeline.disk.size} would shrink {pipeline.parent.name}'s disk from "
                            f"{format_size(parent_size)} to {format_size(target)}",
                            hint=f"use +N growth or at least {format_size(parent_size)}")
    dest.unlink(missing_ok=True)
    run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", parent_image.resolve(), dest, str(target)],
        stage="bake", timeout=60)
    log.info("work disk %s: overlay of %s, %s", dest.name, parent_image.name, human_bytes(target))
    return target


class SharedCache(Protocol):
    """Where a bake may find its image made already, and where it shares what it made (the registry:
    ``cloudbake.remote.share.REGISTRY``). Handed in by the caller, so the image stage never imports
    the remote one."""

    def pull(self, pipeline: Pipeline, paths: Paths, key: str) -> Path | None: ...

    def push(self, pipeline: Pipeline, image: Path) -> None: ...


def _already_baked(build: Build, paths: Paths) -> Path | None:
    """The published image for the build's key, checked against its manifest; None when not published."""
    dest = build.published(paths)
    if not is_published(dest):
        return None
    verify_chain(dest)
    log.info("up to date: %s", dest)
    return dest


def run_bake(pipeline: Pipeline, paths: Paths, *, force: bool = False, shared: SharedCache | None = None) -> Path:
    """Bake unless the image for the current key is already published; returns the published image.

    ``force`` bakes again even then (``cloudbake bake --force``, ``doit bake --force``), except when
    another process finished the same bake while this one waited for the lock. ``shared`` is
    asked for the image before a bake and given it after one. The build is resolved once (once
    more only when this bake had to pin the upstream image first).

    A layered image (``from:``) bakes its parent first, unless that is published already. A
    flattened one needs its parent only to be baked: when it is published, or pulled from the
    registry, its parent is left alone.
    """
    def bake_parent() -> Path | None:
        assert pipeline.parent is not None
        return run_bake(pipeline.parent, resolve_paths(pipeline.parent), shared=shared)

    # A layer is usable only beside its parent: make sure of that before anything else.
    parent_image = bake_parent() if pipeline.is_layer else None
    build = resolve_build(pipeline, paths) if paths.lock_file.exists() else None
    if build is not None and not force and (done := _already_baked(build, paths)) is not None:
        return done
    with file_lock(paths.work_dir / "bake.lock", f"the bake of {pipeline.name}") as waited:
        if build is not None and (waited or not force) and (done := _already_baked(build, paths)) is not None:
            return done  # another process baked it while we waited
        if build is not None and not force and not pipeline.is_layer and shared is not None:
            pulled = shared.pull(pipeline, paths, build.key)
            if pulled is not None:
                return pulled
        _sweep_temps(pipeline, paths)
        if parent_image is None and pipeline.parent is not None:
            parent_image = bake_parent()
        timer = _Timer()
        if parent_image is not None:
            upstream, lock = parent_image, build.lock if build is not None else None
        else:
            with timer.step("fetch"):
                upstream, lock = ensure_image(pipeline, paths)
        if build is None or build.lock != lock:
            build = resolve_build(pipeline, paths)
        log.info("baking %s (key %s)%s", build.published(paths).name, build.key,
                 f" on {upstream.name}" if parent_image is not None else "")
        baked = _bake(build, paths, upstream, timer)
    if pipeline.is_layer:
        log.info("not shared through cache.remote: %s is a layer over %s (disk.flatten: false)", baked.name,
                 upstream.name)
    elif shared is not None:
        shared.push(pipeline, baked)
    return baked


def _sweep_temps(pipeline: Pipeline, paths: Paths) -> None:
    """Under the bake lock no other writer of this pipeline's work folder or published images is alive:
    their temps are a killed bake's. Elsewhere, only old ones."""
    sweep_temps(paths.work_dir, older_than_s=0)
    sweep_temps(paths.output_dir, older_than_s=0, prefix=f".{pipeline.name}-")
    sweep_temps(paths.output_dir, older_than_s=STALE_TEMP_S)
    for folder in (paths.images_cache, paths.cache_dir / "keys", paths.cache_dir / "host",
                   paths.cache_dir / "firmware"):
        sweep_temps(folder, older_than_s=STALE_TEMP_S)


@dataclass(frozen=True)
class BakeVm:
    """The bake's VM before it boots: its spec, how the accelerator was chosen, the seed's digest and nonce."""

    spec: VmSpec
    choice: AccelChoice
    seed_digest: str
    nonce: str


def _bake(build: Build, paths: Paths, upstream: Path, timer: _Timer) -> Path:
    """Boot ``upstream`` (the cached upstream image, or the parent's published one) with the seed; publish."""
    pipeline = build.pipeline
    parent = read_manifest(upstream) if build.parent is not None else None
    started = time.time()
    bake_vm = _prepare(build, paths, upstream, parent, timer)
    if pipeline.cloud_init.generalize:
        log.info("the guest generalizes itself before power-off (cloud-init clean --logs --machine-id, SSH host "
                 "keys removed), so every clone boots as a new machine")
    result, seconds, used = _boot_until_powered_off(bake_vm, paths, timer, pipeline.vm.timeout_s)
    bake_vm = dataclasses.replace(bake_vm, choice=used)   # the manifest says what really ran
    log.info("guest powered off after %.0f s", seconds)
    _check_result(result, pipeline, paths)
    dest = build.published(paths)
    manifest = _manifest(build, bake_vm, result, parent, started, timer)
    manifest["image"] = {"file": dest.name, **manifest["image"]}
    backing = upstream if parent is not None and not pipeline.disk.flatten else None
    with timer.step("publish"):
        publish(paths.work_disk, dest, manifest, pipeline.disk.compression, backing=backing)
    paths.work_disk.unlink(missing_ok=True)
    log.info("published %s (%s) in %.0f s", dest, human_bytes(dest.stat().st_size), time.time() - started)
    return dest


def _prepare(build: Build, paths: Paths, upstream: Path, parent: Manifest | None, timer: _Timer) -> BakeVm:
    """The seed ISO with a fresh boot nonce, the work disk over ``upstream``, firmware and accelerator."""
    pipeline = build.pipeline
    nonce = secrets.token_hex(16)
    with timer.step("seed"):
        seed_digest = build_seed_iso(with_boot_nonce(build.seed, nonce), paths.seed_iso)
    with timer.step("work_disk"):
        if parent is not None:
            make_layer_disk(upstream, int(parent.document["image"]["virtual_size"]), paths.work_disk, pipeline)
        else:
            make_work_disk(upstream, paths.work_disk, pipeline)
    if parent is not None and pipeline.vm.firmware is Firmware.auto:
        firmware = parent.firmware  # the parent booted this disk already
    else:
        firmware = resolve_firmware(pipeline.vm.firmware, pipeline.source.arch, upstream)
    host = detect_host()
    choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, host, paths.cache_dir)
    spec = dataclasses.replace(machine_shape(pipeline, choice.accel, firmware, bake=True), disk=paths.work_disk,
                               serial_log=paths.serial_log, qmp_socket=paths.work_dir / "qmp.sock",
                               seed=paths.seed_iso)
    if firmware == "uefi":
        spec = with_uefi(spec, host, paths.cache_dir, paths.work_dir / "efivars.fd")
    log.info("firmware: %s; serial console: %s", firmware, paths.serial_log)
    return BakeVm(spec, choice, seed_digest, nonce)


def _boot_until_powered_off(bake_vm: BakeVm, paths: Paths, timer: _Timer,
                            timeout_s: float) -> tuple[CloudInitResult, float, AccelChoice]:
    """Boot once: cloud-init's result from the serial console, how long the guest ran, and the accelerator
    that ran it (a KVM that cannot run guests falls back to TCG)."""
    with timer.step("boot"), boot_with_fallback(bake_vm.spec, bake_vm.choice, paths.cache_dir, "bake") as (vm,
                                                                                                         used):
        exit_ = vm.wait(timeout_s, watch_power_off=True)
        serial = paths.serial_log.read_bytes().decode("utf-8", errors="replace")
        result = parse_cloud_init_result(serial, bake_vm.nonce)
        failed = result is None or bool(result.errors)
        if exit_.powered_off:
            if failed:   # -no-shutdown is asked for to look at a failing guest: leave it to the user
                log.warning("%s", vm.keep_for_inspection())
            else:
                vm.quit_now()   # powered off and done: no need to wait for the rest of vm.timeout
        if result is None:
            raise vm.failure("the guest powered off without reporting cloud-init's result (was the seed "
                             "found? did cloud-init run?)")
    return result, exit_.seconds, used


def _check_result(result: CloudInitResult, pipeline: Pipeline, paths: Paths) -> None:
    """Warnings for cloud-init's recoverable errors; its errors, or a missing generalization, fail the bake."""
    for level, messages in result.recoverable.items():
        for message in messages:
            log.warning("cloud-init %s: %s", level.lower(), message)
    if result.profile is not None:
        result.profile.report(log)
    if result.guest_schema:
        # The guest's cloud-init may be older or newer than the schema cloudbake checks with: its own
        # verdict, in full, instead of the advice to run it in a guest that is then thrown away.
        log.warning("the guest's cloud-init warned about the user-data; what it says (cloud-init --version, "
                    "schema --system --annotate, status --long):\n%s", redact_control(result.guest_schema))
    if result.errors:
        modules = result.failing_modules()
        raise PipelineError(
            f"cloud-init reported errors{' in module ' + ', '.join(modules) if modules else ''}:\n  "
            + "\n  ".join(result.errors)
            + f"\n--- last lines of {paths.serial_log} ---\n{serial_tail(paths.serial_log)}",
            hint="fix the user-data (see the module named above); nothing was published")
    if pipeline.cloud_init.generalize and not result.generalized:
        raise PipelineError("the guest did not confirm the generalization step", hint=f"see {paths.serial_log}")


def _manifest(build: Build, bake_vm: BakeVm, result: CloudInitResult, parent: Manifest | None, started: float,
              timer: _Timer) -> dict[str, Any]:
    """What the published image's manifest records: its key and inputs, the upstream, QEMU, cloud-init."""
    pipeline, lock, spec = build.pipeline, build.lock, bake_vm.spec
    manifest: dict[str, Any] = {
        "name": pipeline.name,
        "key": build.key,
        "created": dt.datetime.fromtimestamp(started, dt.UTC).isoformat().replace("+00:00", "Z"),
        "cloudbake_version": __version__,
        "inputs": {
            **build.inputs,
            "upstream": {"url": lock.url, "serial": lock.serial, "sha256": lock.sha256, "signed_by": lock.signed_by,
                         "signature_time": lock.signature_time},
            "seed_iso_sha256": bake_vm.seed_digest,
        },
        "qemu": {"version": qemu_version(qemu_binary(pipeline.source.arch)), "accel": bake_vm.choice.accel,
                 "accel_reason": bake_vm.choice.reason, "firmware": spec.firmware, "machine": spec.arch.value},
        "cloud_init": {"errors": result.errors, "recoverable_errors": result.recoverable,
                       "datasource": result.datasource, "generalized": result.generalized},
        "durations_s": timer.steps,
        **({"boot_profile": result.profile.as_manifest()} if result.profile is not None else {}),
        "image": {"compression": str(pipeline.disk.compression)},
    }
    if parent is not None:
        manifest["parent"] = {"name": parent.name, "key": parent.key, "file": parent.image_file,
                              "sha256": parent.image_sha256}
    return manifest


def clean_bake(pipeline: Pipeline, paths: Paths) -> None:
    """``doit clean bake``: the bake's work files and the image it published for the current key."""
    import shutil

    removed = []
    if paths.work_dir.is_dir():
        shutil.rmtree(paths.work_dir / "artifacts", ignore_errors=True)
        for name in ("disk.qcow2", "efivars.fd", "seed.iso", "bake.lock"):
            (paths.work_dir / name).unlink(missing_ok=True)
        for log_file in paths.work_dir.glob("serial*.log"):
            log_file.unlink()
        removed.append(str(paths.work_dir))
    try:
        key = resolve_key(pipeline, paths)[0]
    except PipelineError:
        key = None
    if key is not None:
        image = published_image(paths, pipeline.name, key)
        pointer = paths.output_dir / f"{pipeline.name}.qcow2"
        if pointer.is_symlink() and pointer.resolve() == image.resolve():
            pointer.unlink()
        for path in (image, manifest_path(image), image.with_name(image.name + ".verified")):
            if path.exists():
                path.unlink()
                removed.append(path.name)
    log.info("removed %s", ", ".join(removed) if removed else "nothing (no bake files)")


