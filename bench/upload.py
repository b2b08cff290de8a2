"""Upload throughput: cloudbake's project upload against a plain `tar c | ssh tar x` of the same tree.

    .venv/bin/python -m bench.upload [--mib 256] [--rounds 3]

Bakes the bench project (several minutes under TCG), boots one VM through the Python API and
sends the same tree both ways into fresh folders, alternating, so load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from bench.common import alternate, report
from bench.project import make_bench_project


def make_tree(root: Path, mib: int) -> list[str]:
    """A source-tree-like mix: many small files and a few large ones, incompressible."""
    names = []
    for index in range(2000):
        name = f"src/pkg{index % 40}/mod{index}.py"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(4096))
        names.append(name)
    big = (mib << 20) - 2000 * 4096
    for index in range(4):
        name = f"data/blob{index}.bin"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(max(0, big // 4)))
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import dataclasses

    import cloudbake
    from cloudbake.config.pipeline import load_pipeline

    project = make_bench_project()
    project.doit("bake")
    tree = Path(tempfile.mkdtemp(prefix="cloudbake-upload-tree-"))
    names = make_tree(tree, args.mib)
    loaded = load_pipeline(project.pipeline)
    pipeline = dataclasses.replace(loaded, test=dataclasses.replace(loaded.test, upload=None, workdir="/var/tmp/cb"))
    counter = iter(range(1000))
    with cloudbake.vm(pipeline, upload=False) as vm:
        vm.run("sudo -n install -d -o \"$(id -un)\" /var/tmp/cb /var/tmp/plain", check=True)

        def cloudbake_upload() -> None:
            vm.run("rm -rf /var/tmp/cb/*", check=True)
            vm.upload_tree(tree, names)

        def plain_tar_ssh() -> None:
            target = f"/var/tmp/plain/{next(counter)}"
            ssh = shlex.join(vm.ssh_argv(f"rm -rf /var/tmp/plain/* && mkdir -p {target} && tar -x -f - -C {target}"))
            subprocess.run(f"tar -c -f - {' '.join(shlex.quote(n) for n in names)} | {ssh}", shell=True, cwd=tree,
                           check=True)

        medians = alternate(args.rounds, plain=plain_tar_ssh, cloudbake=cloudbake_upload)
        sent = vm.run("du -sb /var/tmp/cb | cut -f1", check=True).stdout.strip()
    size = sum((tree / n).stat().st_size for n in names)
    mib_s = {name: size / (1 << 20) / seconds for name, seconds in medians.items()}
    report(f"upload of {len(names)} files, {size / (1 << 20):.0f} MiB, median of {args.rounds} rounds", [
        ("tar c | ssh tar x", f"{medians['plain']:.2f} s  {mib_s['plain']:.1f} MiB/s"),
        ("cloudbake upload", f"{medians['cloudbake']:.2f} s  {mib_s['cloudbake']:.1f} MiB/s"),
        ("throughput ratio", f"{mib_s['cloudbake'] / mib_s['plain']:.2f}x (goal >= 0.8x)"),
        ("bytes in the guest", sent),
    ])


if __name__ == "__main__":
    main()
