"""What the CI workflow asks of cloudbake besides doit's tasks: the folders to cache, and a job summary.

    python -m cloudbake.ci outputs PIPELINE [--image NAME]    lines for $GITHUB_OUTPUT: lock, dist, downloads, upstream
    python -m cloudbake.ci summary PIPELINE [--image NAME] [--image-cache-hit true|false|""] [--lock-fetched ...]
    python -m cloudbake.ci images PIPELINE                    JSON: every image's name and key, for a job matrix
    python -m cloudbake.ci packages PIPELINE [--image NAME]   the Debian/Ubuntu packages its bake and test runs need

``--image`` names one image of a file that describes several (matrix:, images:).

All three read the pipeline and its locks offline; none boots or downloads anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_images, load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.core.units import human_bytes
from cloudbake.image.build import resolve_key
from cloudbake.image.store import Manifest, published_image, read_manifest
from cloudbake.source.lock import read_lock


def ci_images(pipeline_file: Path) -> list[dict[str, str]]:
    """Every image of the file, parents first, with its key: ``strategy.matrix.include`` for one job per image."""
    images = []
    for pipeline in load_images(pipeline_file):
        paths = resolve_paths(pipeline)
        # An image whose lock is not committed is pinned in its own job (with a warning there).
        key = resolve_key(pipeline, paths)[0] if paths.lock_file.exists() else "unpinned"
        images.append({"image": pipeline.name, "key": key, "parent": pipeline.parent.name if pipeline.parent else ""})
    return images


def ci_outputs(pipeline_file: Path, image: str | None = None) -> dict[str, str]:
    """Folders the workflow caches (absolute), and the upstream digest that keys the download cache."""
    pipeline = load_pipeline(pipeline_file, image)
    paths = resolve_paths(pipeline)
    try:
        lock = read_lock(paths.lock_file)
        upstream = lock.sha256 if lock else "unpinned"
    except PipelineError:
        upstream = "invalid"  # the key step says why (doit cache-key reads the lock too)
    return {
        "lock": str(paths.lock_file),
        "dist": str(paths.output_dir),
        "downloads": str(paths.images_cache),
        "upstream": upstream,
    }


def ci_packages(pipeline_file: Path, image: str | None = None) -> list[str]:
    """The apt packages this pipeline needs on the runner: QEMU for its guest's architecture only, its
    firmware, qemu-img, gpgv, and the programs test runs need (``core.tools.run_tools``)."""
    from cloudbake.config.model import Arch, Firmware
    from cloudbake.core.tools import TOOLS, run_tools
    from cloudbake.qemu.host import QEMU_BINARY

    pipeline = load_pipeline(pipeline_file, image)
    arch = pipeline.source.arch
    names = [QEMU_BINARY[arch], "qemu-img", "gpgv",
             *run_tools(warm=pipeline.test.warm, git=pipeline.test.upload == "git")]
    packages = [TOOLS[name].apt for name in names]
    if pipeline.vm.firmware is not Firmware.bios:
        packages.append("qemu-efi-aarch64" if arch is Arch.arm64 else "ovmf")
    return list(dict.fromkeys(packages))


def job_summary(pipeline_file: Path, image_cache: str, lock_fetched: bool, image_name: str | None = None) -> str:
    """Markdown for $GITHUB_STEP_SUMMARY: key, cache hit or miss, stage durations, image size, accelerator."""
    lines = ["## cloudbake" + (f": {image_name}" if image_name else ""), ""]
    try:
        pipeline = load_pipeline(pipeline_file, image_name)
        paths = resolve_paths(pipeline)
        key = resolve_key(pipeline, paths)[0]
    except PipelineError as err:
        return "\n".join([*lines, "The image key could not be computed:", "", "```", str(err), "```", ""])
    image = published_image(paths, pipeline.name, key)
    lines += ["| | |", "|---|---|", f"| key | `{key}` |", f"| image cache | {image_cache or 'not reached'} |"]
    manifest = _manifest(image)
    if manifest is None:
        lines.append("| image | not baked in this run |")
    else:
        lines.append(f"| image | `{image.name}`, {human_bytes(image.stat().st_size)} |")
        lines.append(f"| baked with | {manifest.accel or '?'} ({manifest.accel_reason}) |")
        if manifest.durations_s:
            lines.append("| bake stages | " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in
                                                       manifest.durations_s.items()) + " |")
    if lock_fetched:
        lines += ["", f"**`{paths.lock_file.name}` was missing**: this run resolved and pinned the upstream image "
                      f"itself. Commit `{paths.lock_file.name}` (see the uploaded logs, or run `cloudbake fetch` "
                      "locally) so every run computes the same key and reuses the image."]
    return "\n".join(lines) + "\n"


def _manifest(image: Path) -> Manifest | None:
    if not image.is_file():
        return None
    try:
        return read_manifest(image)
    except PipelineError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudbake.ci")
    parser.add_argument("command", choices=["outputs", "summary", "images", "packages"])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--image", default=None, help="one image of a file that describes several")
    parser.add_argument("--image-cache-hit", default="", help="actions/cache's cache-hit output")
    parser.add_argument("--lock-fetched", default="false")
    args = parser.parse_args(argv)
    if args.command in ("outputs", "images", "packages"):
        try:
            if args.command == "images":
                print(json.dumps(ci_images(args.pipeline)))
                return 0
            if args.command == "packages":
                print(" ".join(ci_packages(args.pipeline, args.image)))
                return 0
            outputs = ci_outputs(args.pipeline, args.image)
        except PipelineError as err:
            print(f"cloudbake: {err}", file=sys.stderr)
            return 1
        print("\n".join(f"{name}={value}" for name, value in outputs.items()))
        return 0
    image_cache = "hit" if args.image_cache_hit == "true" else "miss"
    print(job_summary(args.pipeline, image_cache, args.lock_fetched == "true", args.image), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
