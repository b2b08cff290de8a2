"""validate and status: what a user asks before a bake (is everything in place?) and after (what is there?).

Both are offline and boot nothing: they read the pipeline, the seed, the lock, the host's
tools and firmware, and the folders cloudbake writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cloudbake.config.model import Firmware, Pipeline
from cloudbake.config.paths import Paths
from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger
from cloudbake.core.tools import require_tool, run_tools
from cloudbake.core.units import human_bytes
from cloudbake.image.build import require_lock, resolve_key
from cloudbake.image.seed import build_seed_files
from cloudbake.image.store import is_published, published_image
from cloudbake.qemu.firmware import find_uefi
from cloudbake.qemu.host import detect_host, qemu_binary, qemu_version, read_kvm_verdict, resolve_accel
from cloudbake.source.fetch import cached_upstream
from cloudbake.source.lock import read_lock

# Below this much free space where images are written, a bake will likely fail part way.
LOW_DISK_BYTES = 10 << 30

log = stage_logger("validate")


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str
    fatal: bool = True  # False: a warning, the bake can still run


def _check(what: str, action: Any, fatal: bool = True) -> Check:
    try:
        return Check(what, True, str(action()))
    except PipelineError as err:
        return Check(what, False, str(err), fatal)


def _free(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def run_checks(pipeline: Pipeline, paths: Paths) -> list[Check]:
    """Every check, in the order a bake would hit them."""
    arch = pipeline.source.arch
    host = detect_host()

    def seed() -> str:
        files = build_seed_files(pipeline, for_bake=True)
        return f"user-data valid ({len(files.user_data)} bytes merged)"

    def lock() -> str:
        found = require_lock(paths, pipeline)
        return f"pins serial {found.serial}, sha256 {found.sha256[:12]}…"

    def qemu() -> str:
        binary = qemu_binary(arch)
        return f"{binary}, QEMU {qemu_version(binary)}"

    def firmware() -> str:
        if pipeline.vm.firmware is Firmware.bios:
            return "BIOS (vm.firmware: bios)"
        files = find_uefi(arch, host)
        return f"UEFI {files.code} (from {files.source})"

    def accelerator() -> str:
        choice = resolve_accel(pipeline.vm.accel, arch, host, paths.cache_dir)
        probe = "; probed at the first boot, TCG if KVM cannot run guests" if choice.probe else ""
        return f"{choice.accel}: {choice.reason}{probe}"

    def disk() -> str:
        free = min(_free(paths.output_dir), _free(paths.cache_dir), _free(paths.work_dir))
        if free < LOW_DISK_BYTES:
            raise PipelineError(f"only {human_bytes(free)} free where images are written "
                                f"(a bake needs several GiB)", hint="free some space or move output.dir/cache.dir")
        return f"{human_bytes(free)} free"

    return [
        Check("pipeline", True, f"{pipeline.file} ({pipeline.name}, {pipeline.source.distro} {pipeline.source.release} "
                                f"{arch})"),
        _check("user-data", seed),
        _check("lock", lock, fatal=False),
        _check("qemu", qemu),
        _check("qemu-img", lambda: require_tool("qemu-img")),
        _check("gpgv", lambda: require_tool("gpgv")),
        # What test runs need (a bake does not): warnings here, refused before a test VM boots.
        *(_check(name, functools.partial(_run_tool, name), fatal=False)
          for name in run_tools(warm=pipeline.test.warm, git=pipeline.test.upload == "git")),
        _check("firmware", firmware),
        _check("accelerator", accelerator),
        _check("disk", disk, fatal=False),
    ]


def _run_tool(name: str) -> str:
    return f"{require_tool(name)} (test runs need it)"


def run_validate(pipeline: Pipeline, paths: Paths) -> None:
    """Print every check; fail when one that a bake needs failed."""
    checks = run_checks(pipeline, paths)
    for check in checks:
        mark = "ok" if check.ok else ("FAIL" if check.fatal else "warn")
        print(f"{mark:>4}  {check.what:<12} {check.detail}", flush=True)
    failed = [c.what for c in checks if not c.ok and c.fatal]
    if failed:
        raise PipelineError(f"not ready to bake: {', '.join(failed)} (details above)")


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def collect_status(pipeline: Pipeline, paths: Paths) -> dict[str, Any]:
    """Key, lock, image present or not, cache sizes, the host's accelerator: plain values for --json."""
    status: dict[str, Any] = {"pipeline": str(pipeline.file), "name": pipeline.name}
    try:
        key = resolve_key(pipeline, paths)[0]
        image = published_image(paths, pipeline.name, key)
        status.update(key=key, image=str(image), baked=is_published(image))
        if status["baked"]:
            with contextlib.suppress(OSError, ValueError):
                status["boot_profile"] = json.loads(image.with_suffix(".json").read_text()).get("boot_profile")
    except PipelineError as err:
        status.update(key=None, key_error=err.message, baked=False)
    try:
        lock = read_lock(paths.lock_file)
        status["lock"] = None if lock is None else {"serial": lock.serial, "sha256": lock.sha256,
                                                    "signed_by": lock.signed_by,
                                                    "signature_time": lock.signature_time}
    except PipelineError as err:
        status["lock"] = {"error": err.message}
    upstream = cached_upstream(pipeline, paths)
    status["upstream_cached"] = str(upstream) if upstream else None
    status["download_cache_bytes"] = _folder_bytes(paths.images_cache)
    status["published_bytes"] = sum(p.stat().st_size for p in paths.output_dir.glob(f"{pipeline.name}-*.qcow2")
                                    if p.is_file() and not p.is_symlink()) if paths.output_dir.is_dir() else 0
    choice = resolve_accel(pipeline.vm.accel, pipeline.source.arch, detect_host(), paths.cache_dir)
    status["accelerator"] = {**asdict(choice), "remembered_kvm_verdict": read_kvm_verdict(paths.cache_dir)}
    return status


def run_status(pipeline: Pipeline, paths: Paths, as_json: bool = False) -> None:
    status = collect_status(pipeline, paths)
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True), flush=True)
        return
    lock = status["lock"]
    lines = [
        f"pipeline     {status['pipeline']}",
        f"key          {status['key'] or 'none: ' + status.get('key_error', '')}",
        f"image        {'baked: ' + status['image'] if status['baked'] else 'not baked'}",
        f"lock         {'missing' if lock is None else lock.get('error') or 'serial ' + str(lock['serial'])}",
        f"upstream     {'cached' if status['upstream_cached'] else 'not in the download cache'}",
        f"caches       downloads {human_bytes(status['download_cache_bytes'])}, "
        f"published {human_bytes(status['published_bytes'])}",
        f"accelerator  {status['accelerator']['accel']} ({status['accelerator']['reason']})",
    ]
    profile = status.get("boot_profile") or {}
    if profile.get("slowest_units"):
        lines.append("boot         " + ", ".join(f"{u['unit']} {u['seconds']:.1f} s"
                                                 for u in profile["slowest_units"][:5]) + " (the bake's slowest units)")
    if status["accelerator"]["remembered_kvm_verdict"]:
        lines.append(f"kvm verdict  {status['accelerator']['remembered_kvm_verdict']}")
    print("\n".join(lines), flush=True)


def run_prune_downloads(images: Sequence[tuple[Pipeline, Paths]]) -> None:
    """Delete downloaded upstream images other than the ones the file's locks pin (and their records)."""
    kept = [found for pipeline, paths in images if pipeline.parent is None
            for found in [cached_upstream(pipeline, paths)] if found is not None]
    paths = images[0][1]
    removed = 0
    if paths.images_cache.is_dir():
        for file in sorted(paths.images_cache.iterdir()):
            if any(file.name.startswith(keep.name) for keep in kept):
                continue
            if file.is_file():
                removed += file.stat().st_size
                file.unlink()
    stage_logger("prune").info("removed %s of downloads%s", human_bytes(removed),
                               f"; kept {', '.join(keep.name for keep in kept)}" if kept else "")
