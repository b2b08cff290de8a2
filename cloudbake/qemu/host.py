"""The host: its OS and architecture, which accelerator to use (KVM, hvf, TCG), and what it
remembered about a broken KVM."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from cloudbake.config.model import Accel, Arch
from cloudbake.core.errors import PipelineError
from cloudbake.core.runner import run
from cloudbake.core.tools import require_tool

QEMU_BINARY = {Arch.amd64: "qemu-system-x86_64", Arch.arm64: "qemu-system-aarch64"}




QEMU_ARCH = {Arch.amd64: "x86_64", Arch.arm64: "aarch64"}


HOST_ARCH = {"x86_64": Arch.amd64, "amd64": Arch.amd64, "aarch64": Arch.arm64, "arm64": Arch.arm64}


HOMEBREW_PREFIXES = (Path("/opt/homebrew"), Path("/usr/local"))


@dataclass(frozen=True)
class Host:
    """What accelerator choice depends on; a test builds one for macOS."""

    system: str                   # platform.system(): Linux, Darwin
    machine: str                  # platform.machine(): x86_64, aarch64, arm64
    kvm_usable: bool              # /dev/kvm opens read-write
    homebrew_prefix: Path | None = None

    @property
    def arch(self) -> Arch | None:
        return HOST_ARCH.get(self.machine.lower())


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _homebrew_prefix() -> Path | None:
    brew = shutil.which("brew")
    if brew:
        with contextlib.suppress(PipelineError):
            prefix = run([brew, "--prefix"], stage="qemu", timeout=20).stdout.strip()
            if prefix:
                return Path(prefix)
    return next((p for p in HOMEBREW_PREFIXES if (p / "share" / "qemu").is_dir()), None)


@functools.cache
def host_cpu_identity() -> dict[str, str]:
    """This host's CPU identity (``cpu_identity``), read once per process: the CPU does not change under
    it. Callers must not modify the dict."""
    return cpu_identity()


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The host CPU a hardware-accelerated guest's ``-cpu host`` copies: its model and a digest of its features.

    A state saved under KVM or hvf with ``-cpu host`` restores only onto a CPU that offers the
    same features; runners of one CI class are not all the same CPU. Linux: vendor, family,
    model, stepping, model name and the flag list of /proc/cpuinfo's first processor. macOS:
    the brand string and feature lists sysctl reports.
    """
    fields: dict[str, str] = {}
    if platform.system() == "Darwin":
        import subprocess

        for name in ("machdep.cpu.brand_string", "machdep.cpu.features", "hw.cpufamily"):
            try:
                done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
                fields[name] = done.stdout.strip() if done.returncode == 0 else ""
            except (OSError, subprocess.SubprocessError):
                fields[name] = ""
        model = fields.get("machdep.cpu.brand_string") or platform.machine()
    else:
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            text = ""
        first = text.split("\n\n", 1)[0]
        for line in first.splitlines():
            name, sep, value = line.partition(":")
            name = name.strip()
            if sep and name in ("vendor_id", "cpu family", "model", "model name", "stepping", "flags",
                                "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features"):
                fields[name] = " ".join(sorted(value.split())) if name in ("flags", "Features") else value.strip()
        model = fields.get("model name") or fields.get("CPU part") or platform.machine()
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"model": model, "id": digest}


def detect_host() -> Host:
    system = platform.system()
    return Host(
        system=system,
        machine=platform.machine(),
        # Only Linux has /dev/kvm; macOS never probes it.
        kvm_usable=system == "Linux" and _kvm_usable(),
        homebrew_prefix=_homebrew_prefix() if system == "Darwin" else None,
    )


@dataclass(frozen=True)
class AccelChoice:
    accel: str      # kvm | hvf | tcg
    reason: str
    probe: bool = False  # auto chose KVM: watch the guest for progress and fall back to TCG


def choose_accel(requested: Accel, guest: Arch, host: Host, kvm_verdict: str | None = None) -> AccelChoice:
    """The accelerator for ``guest`` on ``host``; ``kvm_verdict`` is a remembered 'KVM hangs here'."""
    native = host.arch is guest
    if requested is Accel.tcg:
        return AccelChoice("tcg", "vm.accel: tcg")
    if requested is Accel.kvm:
        if host.system != "Linux":
            raise PipelineError(f"vm.accel: kvm needs a Linux host (this is {host.system})",
                                hint="use vm.accel: auto")
        if not native:
            raise PipelineError(f"vm.accel: kvm cannot run a {guest} guest on a {host.machine} host",
                                hint="use vm.accel: auto (TCG) for foreign architectures")
        if not host.kvm_usable:
            raise PipelineError("vm.accel: kvm but /dev/kvm cannot be opened",
                                hint="add your user to the kvm group, or use vm.accel: auto")
        return AccelChoice("kvm", "vm.accel: kvm")
    if requested is Accel.hvf:
        if host.system != "Darwin" or not native:
            raise PipelineError(f"vm.accel: hvf needs macOS and a guest of the host's arch ({host.machine})",
                                hint="use vm.accel: auto")
        return AccelChoice("hvf", "vm.accel: hvf")
    if host.system == "Darwin":
        if native:
            return AccelChoice("hvf", f"macOS host and {guest} guest: Hypervisor.framework")
        return AccelChoice("tcg", f"{guest} guest on a {host.machine} Mac: software emulation (TCG)")
    if not native:
        return AccelChoice("tcg", f"{guest} guest on a {host.machine} host: software emulation (TCG)")
    if not host.kvm_usable:
        return AccelChoice("tcg", "/dev/kvm is missing or not accessible: software emulation (TCG)")
    if kvm_verdict:
        # One short line on every command; the verdict in full was said when it was seen, and
        # `cloudbake status` shows it.
        return AccelChoice("tcg", "KVM does not run guests on this host (remembered; `cloudbake status` says why): "
                                  "TCG")
    return AccelChoice("kvm", "/dev/kvm is usable", probe=True)


def kvm_verdict_file(cache_dir: Path) -> Path:
    return cache_dir / "host" / "kvm-verdict.json"


def host_fingerprint() -> str:
    return f"{platform.node()} {platform.release()} {platform.machine()}"


def read_kvm_verdict(cache_dir: Path) -> str | None:
    """A remembered 'KVM does not run guests here' for this host: what was seen, and when."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        data = json.loads(kvm_verdict_file(cache_dir).read_text())
        if data.get("host") == host_fingerprint():
            return (f"{data['verdict']}; seen {data['when']}; delete {kvm_verdict_file(cache_dir)} "
                    "to probe again")
    return None


def remember_kvm_broken(cache_dir: Path, verdict: str) -> None:
    """Remember for this host that KVM does not run guests, in QEMU's own words."""
    from cloudbake.core.files import write_atomically

    record = {"host": host_fingerprint(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "verdict": verdict}
    write_atomically(kvm_verdict_file(cache_dir), (json.dumps(record) + "\n").encode())


# What QEMU says (or how it dies) when the host's KVM cannot run a guest, as opposed to a
# mistake in the command line or a missing file, which TCG would hit just the same.
KVM_FAILURE_WORDS = ("kvm", "msr", "-cpu host", "host cpu", "hypervisor", "vmx", "svm")


def kvm_failure_verdict(returncode: int, stderr: str) -> str | None:
    """Why QEMU's early exit under KVM means a broken KVM; None when it failed for another reason.

    A death by signal (the MSR assertion aborts, SIGABRT) or words about KVM or the host CPU
    count as broken KVM; "could not open disk" and other mistakes do not.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = " / ".join(lines[-3:])[:400]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"QEMU died of {name} under KVM before the guest printed anything" + (f": {said}" if said else "")
    if any(word in stderr.lower() for word in KVM_FAILURE_WORDS):
        return f"QEMU exited with status {returncode} under KVM before the guest printed anything: {said}"
    return None


def resolve_accel(requested: Accel, guest: Arch, host: Host, cache_dir: Path) -> AccelChoice:
    """choose_accel with this host's remembered KVM verdict."""
    return choose_accel(requested, guest, host, read_kvm_verdict(cache_dir))


def qemu_binary(arch: Arch) -> str:
    return require_tool(QEMU_BINARY[arch])


def qemu_version(binary: str) -> str:
    first = run([binary, "--version"], stage="qemu", timeout=30).stdout.splitlines()[0]
    return first.replace("QEMU emulator version ", "")


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of memory new processes can take without swapping, or None when the host does not say.

    Linux: MemAvailable (free memory plus the cache the kernel can drop). Elsewhere (macOS):
    physical memory, an upper bound; QEMU's own hvf allocations are lazy there.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None
