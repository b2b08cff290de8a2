"""The bake's overhead over the guest's own boot-to-poweroff, and the no-op rebuild.

    .venv/bin/python -m bench.bake_overhead [--arch arm64] [--rounds 2]

Side by side in one run, rounds alternating, all under TCG with the same disk, seed, firmware and sizes:
1. `doit bake --force` (wall time, download cache warm; includes seed, work disk, boot, zstd publish);
2. plain QEMU booting an overlay of the same upstream image with the same seed ISO, until it powers off,
   with the CPU model cloudbake uses (and, for arm64, also with QEMU's plain `-cpu max`, whose
   pointer authentication algorithm cloudbake replaces);
3. `doit bake` again with nothing changed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import report
from bench.project import make_bench_project
from cloudbake.config.model import Arch
from cloudbake.qemu.argv import VmSpec, cpu_for


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["amd64", "arm64"], default="amd64")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    arch = args.arch
    project = make_bench_project(arch=arch)
    spec = VmSpec(name="bench", arch=Arch(arch), accel="tcg", cpus=2, memory_mib=1024, disk=Path("d"),
                  serial_log=Path("s"), qmp_socket=Path("q"))
    cpus = {"plain QEMU, cloudbake's -cpu": cpu_for(spec)}
    if cpus["plain QEMU, cloudbake's -cpu"] != "max":
        cpus["plain QEMU, -cpu max"] = "max"  # QEMU's own default pointer authentication (QARMA5)
    samples: dict[str, list[float]] = {"doit bake --force": [], **{name: [] for name in cpus}}
    try:
        project.doit("fetch")
        project.doit("bake")  # the seed ISO and a warm download cache for every round
        upstream = next((project.folder / "cache" / "images").glob("*.img"))
        seed = project.folder / "build" / "bench" / "seed.iso"
        for round_ in range(args.rounds):
            start = time.perf_counter()
            project.doit("bake", "--force")
            samples["doit bake --force"].append(time.perf_counter() - start)
            for name, cpu in cpus.items():
                samples[name].append(plain_boot(project.folder / f"plain-{round_}-{len(samples[name])}", arch, cpu,
                                                upstream, seed))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {v[-1]:.1f} s" for n, v in samples.items()), flush=True)
        start = time.perf_counter()
        project.doit("bake")
        noop_s = time.perf_counter() - start
    finally:
        project.server.stop()
    median = {name: statistics.median(values) for name, values in samples.items()}
    plain = median["plain QEMU, cloudbake's -cpu"]
    rows = [(f"{name} (median of {args.rounds})", f"{value:.1f} s  (spread {min(samples[name]):.1f}-"
             f"{max(samples[name]):.1f})") for name, value in median.items()]
    rows.append(("overhead over plain QEMU, same CPU", f"{(median['doit bake --force'] / plain - 1) * 100:+.1f} % "
                 "(goal <= 10 %)"))
    if "plain QEMU, -cpu max" in median:
        rows.append(("pauth-impdef against QEMU's default", f"{plain / median['plain QEMU, -cpu max']:.2f}x"))
    rows.append(("no-op doit bake", f"{noop_s:.2f} s (goal < 1 s)"))
    report(f"bake vs plain QEMU ({arch}, TCG, same disk and seed)", rows)
    shutil.rmtree(project.folder, ignore_errors=True)


def plain_boot(work: Path, arch: str, cpu: str, upstream: Path, seed: Path) -> float:
    """Boot an overlay of the upstream image with the bake's seed ISO until it powers off; seconds."""
    work.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(upstream),
                    str(work / "disk.qcow2"), "3G"], check=True)
    if arch == "amd64":
        binary, machine, code, template = ("qemu-system-x86_64", "q35", "/usr/share/OVMF/OVMF_CODE_4M.fd",
                                           "/usr/share/OVMF/OVMF_VARS_4M.fd")
    else:
        binary, machine, code, template = ("qemu-system-aarch64", "virt", "/usr/share/AAVMF/AAVMF_CODE.fd",
                                           "/usr/share/AAVMF/AAVMF_VARS.fd")
    shutil.copy(template, work / "vars.fd")
    argv = [binary, "-machine", machine, "-accel", "tcg", "-cpu", cpu, "-smp", "2", "-m", "1024M",
            "-nodefaults", "-no-reboot", "-display", "none",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={work / 'vars.fd'}",
            "-drive", f"file={work / 'disk.qcow2'},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            "-nic", "user,model=virtio-net-pci", "-device", "virtio-rng-pci",
            "-serial", f"file:{work / 'serial.log'}"]
    start = time.perf_counter()
    subprocess.run(argv, check=True, timeout=1800)
    seconds = time.perf_counter() - start
    shutil.rmtree(work)
    return seconds


if __name__ == "__main__":
    main()
