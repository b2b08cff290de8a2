"""The bake's overhead over the guest's own boot-to-poweroff, and the no-op rebuild.

    .venv/bin/python -m bench.bake_overhead

Side by side in one run, both under TCG with the same disk, seed, firmware and sizes:
1. `doit bake` (wall time, download cache warm; includes seed, work disk, boot, zstd publish);
2. plain QEMU booting an overlay of the same upstream image with the same seed ISO, until it powers off;
3. `doit bake` again with nothing changed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

from bench.common import report
from bench.project import make_bench_project


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["amd64", "arm64"], default="amd64")
    arch = parser.parse_args().arch
    project = make_bench_project(arch=arch)
    try:
        project.doit("fetch")
        start = time.perf_counter()
        project.doit("bake")
        bake_s = time.perf_counter() - start

        work = project.folder / "plain"
        work.mkdir()
        upstream = next((project.folder / "cache" / "images").glob("*.img"))
        seed = project.folder / "build" / "bench" / "seed.iso"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(upstream),
                        str(work / "disk.qcow2"), "3G"], check=True)
        if arch == "amd64":
            binary, machine, code, template = ("qemu-system-x86_64", "q35", "/usr/share/OVMF/OVMF_CODE_4M.fd",
                                               "/usr/share/OVMF/OVMF_VARS_4M.fd")
        else:
            binary, machine, code, template = ("qemu-system-aarch64", "virt", "/usr/share/AAVMF/AAVMF_CODE.fd",
                                               "/usr/share/AAVMF/AAVMF_VARS.fd")
        shutil.copy(template, work / "vars.fd")
        argv = [binary, "-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024M",
                "-nodefaults", "-no-reboot", "-display", "none",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={work / 'vars.fd'}",
                "-drive", f"file={work / 'disk.qcow2'},if=virtio,format=qcow2",
                "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
                "-nic", "user,model=virtio-net-pci", "-device", "virtio-rng-pci",
                "-serial", f"file:{work / 'serial.log'}"]
        start = time.perf_counter()
        subprocess.run(argv, check=True, timeout=1800)
        plain_s = time.perf_counter() - start

        start = time.perf_counter()
        project.doit("bake")
        noop_s = time.perf_counter() - start
    finally:
        project.server.stop()
    report(f"bake vs plain QEMU ({arch}, TCG, same disk and seed)", [
        ("doit bake (wall)", f"{bake_s:.1f} s"),
        ("plain QEMU boot to power-off", f"{plain_s:.1f} s"),
        ("overhead", f"{(bake_s / plain_s - 1) * 100:+.1f} % (goal <= 10 %)"),
        ("no-op doit bake", f"{noop_s:.2f} s (goal < 1 s)"),
    ])
    shutil.rmtree(project.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
