"""Where every file of a pipeline lives, computed in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloudbake.config.model import Pipeline


@dataclass(frozen=True)
class Paths:
    """Where one image's files go: work folder, output, caches, lock and doit state."""

    work_dir: Path       # build/<name>/: seed, work disk, serial log of the bake
    output_dir: Path     # dist/: published images and manifests
    cache_dir: Path      # downloads, shared between pipelines
    lock_file: Path      # pipeline.lock beside the pipeline file
    state_dir: Path      # the pipeline file's folder: doit's state lives there, as doit's own .doit.db does
    family: str = ""     # the file's top-level name, shared by all its images (one doit state per file)

    @property
    def seed_iso(self) -> Path:
        return self.work_dir / "seed.iso"

    @property
    def work_disk(self) -> Path:
        return self.work_dir / "disk.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.work_dir / "serial.log"

    @property
    def images_cache(self) -> Path:
        return self.cache_dir / "images"

    @property
    def doit_state(self) -> Path:
        """doit's state per pipeline, so two pipelines never share task state.

        SQLite, not doit's JSON file: that one is rewritten whole and in place at the end of
        every command, so commands running side by side read it half-written and crash.
        """
        return self.state_dir / f".doit-{self.family or self.work_dir.name}.sqlite"

    @property
    def runs_dir(self) -> Path:
        return self.work_dir / "runs"


def resolve_paths(pipeline: Pipeline) -> Paths:
    return Paths(
        work_dir=pipeline.build_dir / pipeline.name,
        output_dir=pipeline.output_dir,
        cache_dir=pipeline.cache_dir,
        lock_file=pipeline.root.lock_file,
        state_dir=pipeline.file.parent,
        family=pipeline.family,
    )
