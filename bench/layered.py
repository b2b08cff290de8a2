"""Layered images against baking the same content as one image: bake time and published size.

    .venv/bin/python -m bench.layered [--rounds 2] [--deps-mib 64]

One pipeline file (fixture image, TCG, 2 vCPUs, 1 GiB) with four images:

- ``base``: the bench user-data;
- ``layer``: ``from: base`` with a "dependencies" user-data (``--deps-mib`` of incompressible
  files, standing in for packages), published as a layer (``disk.flatten: false``);
- ``flat``: the same child, published self-contained (``disk.flatten: true``);
- ``single``: base and dependencies in one user-data, baked from the upstream image (the baseline).

``base`` is baked once first. Then the three others are baked again (``--force``) in
alternation, and the bench prints median wall time, the bake's boot and publish steps, and the
published size, each as a ratio to ``single``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
import time

from bench.common import report
from bench.project import make_bench_project

DEPS = """\
#cloud-config
write_files:
  - path: /etc/bench-deps
    content: deps
runcmd:
  - [sh, -c, "mkdir -p /opt/deps && head -c {size} /dev/urandom > /opt/deps/blob && sync"]
"""

SINGLE = """\
#cloud-config
write_files:
  - path: /etc/bench
    content: bench
  - path: /etc/bench-deps
    content: deps
runcmd:
  - [sh, -c, "mkdir -p /opt/deps && head -c {size} /dev/urandom > /opt/deps/blob && sync"]
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deps-mib", type=int, default=64)
    args = parser.parse_args()
    project = make_bench_project()
    size = args.deps_mib << 20
    (project.folder / "cloud-init" / "deps.yaml").write_text(DEPS.format(size=size))
    (project.folder / "cloud-init" / "single.yaml").write_text(SINGLE.format(size=size))
    project.pipeline.write_text(project.pipeline.read_text() + textwrap.dedent("""\
        images:
          - name: base
          - name: layer
            from: base
            cloud_init: {user_data: cloud-init/deps.yaml}
            disk: {flatten: false}
          - name: flat
            from: base
            cloud_init: {user_data: cloud-init/deps.yaml}
            disk: {flatten: true}
          - name: single
            cloud_init: {user_data: cloud-init/single.yaml}
        """))
    started = time.perf_counter()
    project.doit("bake:base")
    print(f"base baked in {time.perf_counter() - started:.0f} s", flush=True)
    walls: dict[str, list[float]] = {name: [] for name in ("single", "layer", "flat")}
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in walls}
    sizes: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name in walls:
            started = time.perf_counter()
            project.doit(f"bake:{name}", "--force")
            walls[name].append(time.perf_counter() - started)
            manifest_file = next(p for p in (project.folder / "dist").glob(f"{name}-*.json"))
            manifest = json.loads(manifest_file.read_text())
            steps[name].append(manifest["durations_s"])
            sizes[name] = int(manifest["image"]["file_size"])
            print(f"round {round_ + 1}: {name} {walls[name][-1]:.1f} s, {sizes[name] >> 20} MiB", flush=True)
    base = {name: statistics.median(values) for name, values in walls.items()}
    boot = {name: statistics.median(s.get("boot", 0.0) for s in values) for name, values in steps.items()}
    publish = {name: statistics.median(s.get("publish", 0.0) for s in values) for name, values in steps.items()}
    rows = []
    for name in walls:
        rows.append((f"{name} bake (median of {args.rounds})",
                     f"{base[name]:6.1f} s  {base[name] / base['single']:.2f}x   boot {boot[name]:5.1f} s  "
                     f"publish {publish[name]:4.1f} s"))
    for name in walls:
        rows.append((f"{name} published size", f"{sizes[name] / 2**20:7.1f} MiB  {sizes[name] / sizes['single']:.3f}x"))
    report(f"layered vs one image ({args.deps_mib} MiB of dependencies, TCG)", rows)
    project.server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
