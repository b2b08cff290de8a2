"""test-image: overlay cost, and time to the test command against plain QEMU booting the same overlay to SSH.

    .venv/bin/python -m bench.testimage_startup

Needs a baked image: it bakes the bench project first (several minutes under TCG).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import report
from bench.project import make_bench_project
from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.run.runs import free_port, make_overlay
from cloudbake.run.ssh import ssh_banner
from cloudbake.run.testrun import TestRequest, run_test_image


class _MarkCommandStart(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("running:") and self.at is None:
            self.at = time.perf_counter()


def main() -> None:
    project = make_bench_project()
    try:
        project.doit("bake")
        pipeline = load_pipeline(project.pipeline)
        paths = resolve_paths(pipeline)
        base = Path(next(p for p in paths.output_dir.glob("bench-*.qcow2") if not p.is_symlink()))

        scratch = base.parent / ".bench"
        scratch.mkdir()
        creations = []
        for index in range(10):
            overlay = scratch / f"o{index}.qcow2"
            start = time.perf_counter()
            make_overlay(base, overlay)
            creations.append(time.perf_counter() - start)
        overlay_size = (scratch / "o0.qcow2").stat().st_size

        marker = _MarkCommandStart()
        logging.getLogger("cloudbake.test-image").addHandler(marker)
        start = time.perf_counter()
        run_test_image(pipeline, paths, TestRequest("true"))
        assert marker.at is not None
        to_command = marker.at - start

        seed = scratch / "seed.iso"
        (scratch / "ud").write_text("#cloud-config\n{}\n")
        (scratch / "md").write_text("instance-id: plain-1\n")
        subprocess.run(["cloud-localds", str(seed), str(scratch / "ud"), str(scratch / "md")], check=True)
        shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", scratch / "vars.fd")
        port = free_port()
        argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024M",
                "-nodefaults", "-display", "none",
                "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "-drive", f"if=pflash,format=raw,unit=1,file={scratch / 'vars.fd'}",
                "-drive", f"file={scratch / 'o1.qcow2'},if=virtio,format=qcow2",
                "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
                "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-rng-pci",
                "-serial", f"file:{scratch / 'serial.log'}"]
        start = time.perf_counter()
        proc = subprocess.Popen(argv)
        try:
            while not ssh_banner(port):
                time.sleep(0.5)
            plain_s = time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()
    finally:
        project.server.stop()
    report("test-image startup", [
        ("overlay creation (median of 10)", f"{sorted(creations)[5] * 1000:.0f} ms (goal < 100 ms)"),
        ("overlay size", f"{overlay_size / 1024:.0f} KiB (goal < 1 MiB)"),
        ("cloudbake: start to test command", f"{to_command:.1f} s"),
        ("plain QEMU: start to SSH banner", f"{plain_s:.1f} s"),
        ("ratio", f"{to_command / plain_s:.2f}x (goal <= 1.1x)"),
    ])
    shutil.rmtree(project.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
