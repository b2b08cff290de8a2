"""cloudbake's bake against Packer's QEMU builder on the same image, user-data, firmware and sizes.

    .venv/bin/python -m bench.bake_vs_packer [--rounds 3]

Needs Debian's `packer` package (1.6.6: `disk_image`, `cd_files` seed, `communicator: none`,
its own `qemu-img convert` included). Rounds alternate which tool goes first. Both guests
write their serial console to a file that a watcher reads as it grows, so the guest's phases
(firmware, kernel, cloud-init stages, finish, power-off) are timed the same way for both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import yaml

from bench.common import report
from bench.project import BenchProject, make_bench_project

# Console lines that mark a guest phase, in boot order.
MARKERS = {
    "kernel": "Linux version",
    "init-local": "running 'init-local'",
    "modules:final": "running 'modules:final'",
    "final done": "finished at",
    "power-off": "reboot: Power down",
}


class SerialWatch(threading.Thread):
    """When each marker first shows up in a (re)created serial log, relative to ``t0``."""

    def __init__(self, path: Path, t0: float) -> None:
        super().__init__(daemon=True)
        self.path, self.t0 = path, t0
        self.seen: dict[str, float] = {}
        self.first_byte: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        text, inode = "", None
        while not self.stop.is_set():
            try:
                stat = self.path.stat()
                if stat.st_ino != inode:
                    inode, text = stat.st_ino, ""
                data = self.path.read_bytes().decode(errors="replace")
            except OSError:
                time.sleep(0.05)
                continue
            now = time.perf_counter() - self.t0
            if data and self.first_byte is None:
                self.first_byte = now
            if len(data) > len(text):
                text = data
                for name, marker in MARKERS.items():
                    if name not in self.seen and marker in text:
                        self.seen[name] = now
            time.sleep(0.05)

    def phases(self) -> dict[str, float]:
        points = {"first console byte": self.first_byte or 0.0, **self.seen}
        return points


def packer_user_data(project: BenchProject) -> bytes:
    """What a Packer user would write: cloudbake's rendered user-data (the same user and keys) with the
    bake's finish script swapped for a plain power-off, and without cloudbake's bake-only shortcuts
    (``ssh_genkeytypes: []``): those are cloudbake's to claim, not the baseline's."""
    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.image.build import resolve_build

    pipeline = load_pipeline(project.pipeline)
    build = resolve_build(pipeline, resolve_paths(pipeline))
    document = yaml.safe_load(build.seed.user_data)
    document["power_state"] = {"mode": "poweroff", "delay": "now", "timeout": 120, "condition": True}
    document.pop("ssh_genkeytypes", None)
    return b"#cloud-config\n" + yaml.safe_dump(document).encode()


def packer_template(folder: Path, upstream: Path, digest: str) -> Path:
    template = {"builders": [{
        "type": "qemu", "iso_url": f"file://{upstream}", "iso_checksum": f"sha256:{digest}",
        "disk_image": True, "use_backing_file": False, "format": "qcow2", "disk_size": "3072M",
        "disk_interface": "virtio", "net_device": "virtio-net", "accelerator": "tcg", "headless": True,
        "communicator": "none", "cd_files": [str(folder / "user-data"), str(folder / "meta-data")],
        "cd_label": "cidata", "shutdown_timeout": "30m", "cpus": 2, "memory": 1024,
        "output_directory": str(folder / "out"), "vm_name": "packer.qcow2",
        "qemuargs": [["-bios", "/usr/share/ovmf/OVMF.fd"], ["-serial", f"file:{folder / 'serial.log'}"]],
    }]}
    path = folder / "template.json"
    path.write_text(json.dumps(template, indent=2))
    return path


def run_packer(folder: Path, template: Path) -> tuple[float, dict[str, float]]:
    shutil.rmtree(folder / "out", ignore_errors=True)
    (folder / "serial.log").unlink(missing_ok=True)
    t0 = time.perf_counter()
    watch = SerialWatch(folder / "serial.log", t0)
    watch.start()
    subprocess.run(["packer", "build", "-color=false", str(template)], cwd=folder, check=True,
                   capture_output=True, text=True)
    total = time.perf_counter() - t0
    watch.stop.set()
    return total, watch.phases()


def run_cloudbake(project: BenchProject) -> tuple[float, dict[str, float], dict[str, float]]:
    for image in (project.folder / "dist").glob("bench-*"):
        image.unlink()
    serial = project.folder / "build" / "bench" / "serial.log"
    serial.unlink(missing_ok=True)   # the last round's log holds every marker
    t0 = time.perf_counter()
    watch = SerialWatch(serial, t0)
    watch.start()
    project.doit("bake")
    total = time.perf_counter() - t0
    watch.stop.set()
    manifest = json.loads(next((project.folder / "dist").glob("bench-*.json")).read_text())
    return total, watch.phases(), manifest["durations_s"]


def _guest_table(samples: list[dict[str, float]]) -> str:
    names = ["first console byte", *MARKERS]
    medians = {n: statistics.median(s.get(n, 0.0) for s in samples) for n in names}
    spans = [f"{a} -> {b} {medians[b] - medians[a]:.1f} s" for a, b in itertools.pairwise(names)]
    return "; ".join(spans)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("packer") is None:
        raise SystemExit("packer not found: apt-get install packer (Debian 12: 1.6.6)")
    project = make_bench_project()
    project.doit("fetch")
    upstream = next((project.folder / "cache" / "images").glob("*.img"))
    digest = json.loads((project.folder / "pipeline.lock").read_text())["sha256"]
    packer_dir = project.folder / "packer"
    packer_dir.mkdir()
    (packer_dir / "user-data").write_bytes(packer_user_data(project))
    (packer_dir / "meta-data").write_text("instance-id: packer-bench\nlocal-hostname: cloudbake\n")
    template = packer_template(packer_dir, upstream, digest)
    totals: dict[str, list[float]] = {"cloudbake": [], "packer": []}
    guests: dict[str, list[dict[str, float]]] = {"cloudbake": [], "packer": []}
    steps: list[dict[str, float]] = []
    for index in range(args.rounds):
        order = ("packer", "cloudbake") if index % 2 == 0 else ("cloudbake", "packer")
        for tool in order:
            if tool == "packer":
                total, phases = run_packer(packer_dir, template)
            else:
                total, phases, durations = run_cloudbake(project)
                steps.append(durations)
            totals[tool].append(total)
            guests[tool].append(phases)
            print(f"round {index + 1} {tool}: {total:.1f} s", flush=True)
    median = {tool: statistics.median(values) for tool, values in totals.items()}
    step_names = sorted({name for s in steps for name in s})
    report(f"bake vs Packer {subprocess.run(['packer', 'version'], capture_output=True, text=True).stdout.strip()}, "
           f"amd64 TCG, median of {args.rounds} alternating rounds", [
               ("cloudbake doit bake", f"{median['cloudbake']:.1f} s  (spread {min(totals['cloudbake']):.1f}-"
                                       f"{max(totals['cloudbake']):.1f})"),
               ("packer build", f"{median['packer']:.1f} s  (spread {min(totals['packer']):.1f}-"
                                f"{max(totals['packer']):.1f})"),
               ("cloudbake / packer", f"{median['cloudbake'] / median['packer']:.2f}x (goal <= 0.9x)"),
               ("cloudbake steps (median)", ", ".join(f"{n} {statistics.median(s.get(n, 0) for s in steps):.1f} s"
                                                      for n in step_names)),
               ("cloudbake guest", _guest_table(guests["cloudbake"])),
               ("packer guest", _guest_table(guests["packer"])),
           ])


if __name__ == "__main__":
    main()
