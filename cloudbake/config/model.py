"""The pipeline as code sees it after loading: frozen dataclasses and the enums of the schema.

Nothing here reads a file; ``cloudbake.config.pipeline`` builds these values from the YAML.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.core.units import DiskSize


class Arch(enum.StrEnum):
    amd64 = "amd64"
    arm64 = "arm64"


class Accel(enum.StrEnum):
    auto = "auto"
    kvm = "kvm"
    hvf = "hvf"
    tcg = "tcg"


class Firmware(enum.StrEnum):
    auto = "auto"
    bios = "bios"
    uefi = "uefi"


class Compression(enum.StrEnum):
    none = "none"
    zlib = "zlib"
    zstd = "zstd"


class SignaturePolicy(enum.StrEnum):
    required = "required"
    off = "off"
    none = "none"   # the distribution signs nothing: trust TLS and the first fetch, then the lock


class Distro(enum.StrEnum):
    ubuntu = "ubuntu"
    debian = "debian"
    fedora = "fedora"


@dataclass(frozen=True)
class Verify:
    """How the upstream image is verified before use (``source.verify``)."""

    signature: SignaturePolicy
    keyring: Path | None
    fingerprints: tuple[str, ...]
    sha256: str | None


@dataclass(frozen=True)
class Source:
    """The upstream cloud image: which distribution, release, build and mirror (``source``)."""

    release: str
    arch: Arch
    mirror: str
    channel: str
    verify: Verify
    distro: Distro = Distro.ubuntu


@dataclass(frozen=True)
class Disk:
    """The published image's disk: its size, compression, and whether a layer is flattened."""

    size: DiskSize
    compression: Compression
    flatten: bool      # a layered image: self-contained (True) or backed by its parent's image


@dataclass(frozen=True)
class VM:
    """How the VM runs: CPUs, memory, accelerator, firmware, timeout, extra QEMU arguments."""

    cpus: int
    memory_bytes: int
    accel: Accel
    firmware: Firmware
    timeout_s: float
    qemu_args: tuple[str, ...]        # every boot; not in the key
    bake_qemu_args: tuple[str, ...]   # the bake's boot only; in the key


@dataclass(frozen=True)
class CloudInit:
    """What the seed carries: user-data and its companions, the user, keys, generalization."""

    user_data: Path
    network_config: Path | None
    vendor_data: Path | None
    hostname: str
    user: str
    ssh_authorized_keys: tuple[str, ...]
    strict: bool
    generalize: bool
    ca_certs: str | tuple[Path, ...] = ()   # "host", or PEM files


@dataclass(frozen=True)
class Forward:
    """A guest TCP port reachable on 127.0.0.1 of the host; ``host`` 0 means any free port."""

    host: int
    guest: int


@dataclass(frozen=True)
class Dependencies:
    """``test.dependencies``: the project's dependency files, baked into the image by their content."""

    files: tuple[str, ...]    # paths or globs relative to the pipeline's folder
    install: str | None       # run in test.workdir as the run user at the end of the bake

    def __bool__(self) -> bool:
        return bool(self.files or self.install)


@dataclass(frozen=True)
class TestSettings:
    """How tests run in throwaway VMs (``test``)."""

    command: str
    upload: str | tuple[str, ...] | None    # "git", patterns, or None for nothing
    workdir: str
    env: tuple[tuple[str, str], ...]
    forward: tuple[Forward, ...]
    warm: bool
    timeout_s: float
    artifacts: tuple[str, ...]
    artifacts_max_bytes: int
    parallel: int
    shards: int | None
    dependencies: Dependencies = Dependencies((), None)


@dataclass(frozen=True)
class RemoteCache:
    """``cache.remote``: an OCI registry repository holding baked images tagged with their key."""

    registry: str           # host[:port], as the registry's API and credential stores name it
    repository: str         # path inside the registry, e.g. "acme/images"
    push: bool
    tag_latest: bool
    plain_http: bool
    ca_file: Path | None

    @property
    def url(self) -> str:
        return f"oci://{self.registry}/{self.repository}"


def parse_remote(url: str) -> tuple[str, str]:
    """``oci://host[:port]/repo/sitory`` (as the schema admits it) -> (registry, repository)."""
    registry, _, repository = url.removeprefix("oci://").partition("/")
    return registry.lower(), repository


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline; every path is absolute."""

    file: Path
    name: str
    source: Source
    disk: Disk
    vm: VM
    cloud_init: CloudInit
    test: TestSettings
    output_dir: Path
    output_keep: int
    build_dir: Path
    cache_dir: Path
    remote: RemoteCache | None
    raw: dict[str, Any]  # the validated document with defaults, for hashing and manifests
    # The image this one is built on (``from:``), baked first; None: built on the upstream image.
    parent: Pipeline | None = None
    # The top-level name: shared by every image of the file (one doit state per file).
    family: str = ""
    # The lock pinning the upstream image; a layered image shares its root ancestor's.
    lock_file: Path = Path()

    @property
    def is_layer(self) -> bool:
        """Published as a qcow2 backed by its parent's image (``from:`` with disk.flatten: false): not
        self-contained, so the registry cache does not hold it."""
        return self.parent is not None and not self.disk.flatten

    @property
    def root(self) -> Pipeline:
        """The ancestor built on the upstream image (self when not layered): its source and lock count."""
        return self.parent.root if self.parent is not None else self


# Ubuntu releases whose cloud images cloudbake knows how to find, version -> codename.
RELEASES = {
    "18.04": "bionic", "20.04": "focal", "22.04": "jammy", "23.10": "mantic", "24.04": "noble",
    "24.10": "oracular", "25.04": "plucky", "25.10": "questing", "26.04": "resolute",
}

