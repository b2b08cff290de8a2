"""QEMU: the command line (pure functions), the accelerator, the firmware, and running a VM to its end.

Shared by the bake and by test-image, so both boot the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbake.errors import PipelineError
from cloudbake.log import stage_logger
from cloudbake.pipeline import Accel, Arch, Firmware
from cloudbake.runner import Spawned, require_tool, run, spawn, stop_process, tail

QEMU_BINARY = {Arch.amd64: "qemu-system-x86_64", Arch.arm64: "qemu-system-aarch64"}
QEMU_PACKAGE = {Arch.amd64: "qemu-system-x86", Arch.arm64: "qemu-system-arm"}
QEMU_ARCH = {Arch.amd64: "x86_64", Arch.arm64: "aarch64"}
HOST_ARCH = {"x86_64": Arch.amd64, "amd64": Arch.amd64, "aarch64": Arch.arm64, "arm64": Arch.arm64}
FIRMWARE_PACKAGE = {Arch.amd64: "ovmf", Arch.arm64: "qemu-efi-aarch64"}
AARCH64_PFLASH_BYTES = 64 << 20
# sockaddr_un.sun_path holds 108 bytes including the final NUL; QEMU refuses longer socket paths.
UNIX_SOCKET_PATH_MAX = 107
SERIAL_TAIL_LINES = 30
# A TCG boot takes minutes: say what the guest is doing every so often.
HEARTBEAT_S = 30.0
# Without a byte on the serial console this long after start, a KVM guest counts as hung.
KVM_PROGRESS_TIMEOUT_S = 45.0
ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
HOMEBREW_PREFIXES = (Path("/opt/homebrew"), Path("/usr/local"))
SYSTEM_DESCRIPTOR_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))


# --- the host ---------------------------------------------------------------------------


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
        return AccelChoice("tcg", f"KVM was seen not to run guests on this host ({kvm_verdict}): TCG")
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
    from cloudbake.files import write_atomically

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


# --- firmware ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FirmwareFiles:
    code: Path
    vars_template: Path
    code_format: str = "raw"
    vars_format: str = "raw"
    source: str = ""  # the descriptor or known path it came from


def descriptor_dirs(host: Host, home: Path | None = None) -> list[Path]:
    """QEMU's firmware descriptor folders, highest precedence last (as QEMU's docs order them)."""
    home = home or Path.home()
    dirs = [*SYSTEM_DESCRIPTOR_DIRS, home / ".config" / "qemu" / "firmware"]
    if host.homebrew_prefix is not None:
        dirs.insert(0, host.homebrew_prefix / "share" / "qemu" / "firmware")
    return dirs


def find_uefi_in_descriptors(arch: Arch, dirs: list[Path]) -> FirmwareFiles | None:
    """The best UEFI firmware for ``arch`` named by descriptor files: no Secure Boot, no SMM, by file name."""
    by_name: dict[str, Path] = {}
    for folder in dirs:  # a later folder overrides the same file name
        if folder.is_dir():
            for file in folder.glob("*.json"):
                by_name[file.name] = file
    for name in sorted(by_name):
        try:
            doc = json.loads(by_name[name].read_text())
        except (OSError, ValueError):
            continue
        if "uefi" not in doc.get("interface-types", []):
            continue
        if not any(t.get("architecture") == QEMU_ARCH[arch] for t in doc.get("targets", [])):
            continue
        features = set(doc.get("features", []))
        if features & {"secure-boot", "requires-smm", "enrolled-keys", "amd-sev-es", "intel-tdx"}:
            continue
        mapping = doc.get("mapping", {})
        if mapping.get("device", "flash") != "flash":
            continue
        code = mapping.get("executable", {})
        template = mapping.get("nvram-template", {})
        if not code.get("filename") or not template.get("filename"):
            continue
        code_path, vars_path = Path(code["filename"]), Path(template["filename"])
        if code_path.is_file() and vars_path.is_file():
            return FirmwareFiles(code_path, vars_path, code.get("format", "raw"), template.get("format", "raw"),
                                 source=str(by_name[name]))
    return None


def known_uefi_paths(arch: Arch, host: Host) -> list[tuple[Path, Path]]:
    """Where distros and Homebrew put UEFI firmware, for hosts without descriptors."""
    brew = host.homebrew_prefix / "share" / "qemu" if host.homebrew_prefix else None
    if host.system == "Darwin":  # only Homebrew's (or MacPorts-like prefixes named as Homebrew's)
        if brew is None:
            return []
        if arch is Arch.amd64:
            return [(brew / "edk2-x86_64-code.fd", brew / "edk2-i386-vars.fd")]
        return [(brew / "edk2-aarch64-code.fd", brew / "edk2-arm-vars.fd")]
    if arch is Arch.amd64:
        pairs = [
            (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),  # Debian, Ubuntu
            (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
            (Path("/usr/share/edk2/ovmf/OVMF_CODE.fd"), Path("/usr/share/edk2/ovmf/OVMF_VARS.fd")),  # Fedora
            (Path("/usr/share/edk2/x64/OVMF_CODE.4m.fd"), Path("/usr/share/edk2/x64/OVMF_VARS.4m.fd")),  # Arch
        ]
        if brew:
            pairs.append((brew / "edk2-x86_64-code.fd", brew / "edk2-i386-vars.fd"))
    else:
        pairs = [
            (Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd")),  # Debian, Ubuntu
            (Path("/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw"),
             Path("/usr/share/edk2/aarch64/vars-template-pflash.raw")),  # Fedora
            (Path("/usr/share/edk2/aarch64/QEMU_CODE.fd"), Path("/usr/share/edk2/aarch64/QEMU_VARS.fd")),  # Arch
        ]
        if brew:
            pairs.append((brew / "edk2-aarch64-code.fd", brew / "edk2-arm-vars.fd"))
    return pairs


def find_uefi(arch: Arch, host: Host, home: Path | None = None) -> FirmwareFiles:
    found = find_uefi_in_descriptors(arch, descriptor_dirs(host, home))
    if found:
        return found
    for code, template in known_uefi_paths(arch, host):
        if code.is_file() and template.is_file():
            return FirmwareFiles(code, template, _format_of(code), _format_of(template), source=str(code))
    package = "brew install qemu" if host.system == "Darwin" else f"apt install {FIRMWARE_PACKAGE[arch]}"
    looked = sorted({str(code.parent) for code, _ in known_uefi_paths(arch, host)})
    raise PipelineError(f"no UEFI firmware for {QEMU_ARCH[arch]} found (looked in QEMU's firmware descriptors"
                        f"{' and ' + ', '.join(looked) if looked else ''})",
                        hint=f"{package} (Fedora: dnf install edk2-ovmf / edk2-aarch64)")


def _format_of(path: Path) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read(4) == b"QFI\xfb":
            return "qcow2"
    return "raw"


def prepare_vars(firmware: FirmwareFiles, arch: Arch, dest: Path) -> Path:
    """A private copy of the UEFI variable store for one VM (the template is never written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(firmware.vars_template, dest)
    if arch is Arch.arm64 and firmware.vars_format == "raw" and dest.stat().st_size < AARCH64_PFLASH_BYTES:
        # The virt machine's flash banks are 64 MiB; QEMU refuses smaller raw images.
        with open(dest, "r+b") as f:
            f.truncate(AARCH64_PFLASH_BYTES)
    return dest


def pflash_code(firmware: FirmwareFiles, arch: Arch, cache_dir: Path) -> Path:
    """The code image as QEMU will accept it as pflash: padded to 64 MiB for arm64 when needed."""
    if arch is not Arch.arm64 or firmware.code_format != "raw":
        return firmware.code
    if firmware.code.stat().st_size >= AARCH64_PFLASH_BYTES:
        return firmware.code
    padded = cache_dir / "firmware" / f"{firmware.code.stem}-pflash64m.fd"
    source_stat = firmware.code.stat()
    if not padded.exists() or padded.stat().st_mtime_ns < source_stat.st_mtime_ns:
        import tempfile

        padded.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{padded.name}.", suffix=".tmp", dir=padded.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, open(firmware.code, "rb") as src:
                shutil.copyfileobj(src, out)
                out.truncate(AARCH64_PFLASH_BYTES)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, padded)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return padded


def with_uefi(spec: VmSpec, host: Host, cache_dir: Path, vars_dest: Path) -> VmSpec:
    """``spec`` with UEFI code (padded where needed) and a private copy of the variable store."""
    import dataclasses

    files = find_uefi(spec.arch, host)
    return dataclasses.replace(spec, firmware_code=pflash_code(files, spec.arch, cache_dir),
                               firmware_code_format=files.code_format,
                               firmware_vars=prepare_vars(files, spec.arch, vars_dest),
                               firmware_vars_format=files.vars_format)


def resolve_accel(requested: Accel, guest: Arch, host: Host, cache_dir: Path) -> AccelChoice:
    """choose_accel with this host's remembered KVM verdict."""
    return choose_accel(requested, guest, host, read_kvm_verdict(cache_dir))


def image_has_esp(image: Path) -> bool:
    """True when the disk image's GPT has an EFI system partition (read through qemu-img, no mounts)."""
    import tempfile
    import uuid

    qemu_img = require_tool("qemu-img", "qemu-utils")
    with tempfile.TemporaryDirectory(prefix="cloudbake-gpt-") as tmp:
        head = Path(tmp) / "head.raw"
        run([qemu_img, "dd", "-O", "raw", "bs=512", "count=34", f"if={image}", f"of={head}"],
            stage="qemu", timeout=60)
        data = head.read_bytes()
    if len(data) < 34 * 512 or data[512:520] != b"EFI PART":
        return False
    entries_lba = int.from_bytes(data[512 + 72:512 + 80], "little")
    count = int.from_bytes(data[512 + 80:512 + 84], "little")
    size = int.from_bytes(data[512 + 84:512 + 88], "little")
    for index in range(min(count, 128)):
        offset = entries_lba * 512 + index * size
        if offset + 16 > len(data):
            break
        guid = str(uuid.UUID(bytes_le=data[offset:offset + 16])).upper()
        if guid == ESP_TYPE_GUID:
            return True
    return False


def resolve_firmware(requested: Firmware, arch: Arch, image: Path | None) -> str:
    """'uefi' or 'bios'. arm64 has no BIOS; amd64 follows the image: an ESP means UEFI."""
    if arch is Arch.arm64:
        if requested is Firmware.bios:
            raise PipelineError("vm.firmware: bios is not possible for arm64 guests (the virt machine boots UEFI)",
                                hint="use vm.firmware: auto or uefi")
        return "uefi"
    if requested is not Firmware.auto:
        return str(requested)
    if image is not None and image_has_esp(image):
        return "uefi"
    return "bios"


# --- the command line -------------------------------------------------------------------


@dataclass(frozen=True)
class VmSpec:
    """Everything that decides a QEMU command line."""

    name: str
    arch: Arch
    accel: str
    cpus: int
    memory_mib: int
    disk: Path
    serial_log: Path
    qmp_socket: Path
    seed: Path | None = None
    firmware: str = "uefi"                  # uefi | bios
    firmware_code: Path | None = None
    firmware_code_format: str = "raw"
    firmware_vars: Path | None = None       # this VM's own copy
    firmware_vars_format: str = "raw"
    ssh_port: int | None = None             # forwarded from 127.0.0.1 only
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    interactive: bool = False               # serial console on the terminal (doit console)


def machine_for(spec: VmSpec) -> str:
    if spec.arch is Arch.arm64:
        # highmem is needed for more than a few GiB of RAM and PCI space above 4 GiB; hvf
        # on Apple silicon supports it since QEMU 7.
        return "virt,highmem=on" if spec.accel == "hvf" else "virt"
    return "q35"


def cpu_for(spec: VmSpec) -> str:
    if spec.accel in ("kvm", "hvf"):
        return "host"
    return "max"


def build_qemu_argv(spec: VmSpec, binary: str) -> list[str]:
    """The QEMU command line for ``spec``. Pure: no I/O, so tests read it like the command it is."""
    argv = [binary]
    argv += ["-name", f"cloudbake-{spec.name}"]
    argv += ["-machine", machine_for(spec)]
    argv += ["-accel", spec.accel]
    argv += ["-cpu", cpu_for(spec)]
    argv += ["-smp", str(spec.cpus)]
    argv += ["-m", f"{spec.memory_mib}M"]
    argv += ["-nodefaults"]
    argv += ["-no-reboot"]
    if spec.firmware == "uefi":
        if spec.firmware_code is None or spec.firmware_vars is None:
            raise ValueError("UEFI needs firmware code and a vars copy")
        argv += ["-drive", f"if=pflash,format={spec.firmware_code_format},unit=0,readonly=on,"
                           f"file={_escape(spec.firmware_code)}"]
        argv += ["-drive", f"if=pflash,format={spec.firmware_vars_format},unit=1,file={_escape(spec.firmware_vars)}"]
    argv += ["-drive", f"file={_escape(spec.disk)},if=virtio,format=qcow2,discard=unmap,detect-zeroes=unmap"]
    if spec.seed is not None:
        argv += ["-drive", f"file={_escape(spec.seed)},if=virtio,format=raw,readonly=on"]
    nic = "user,model=virtio-net-pci"
    if spec.ssh_port is not None:
        nic += f",hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"
    argv += ["-nic", nic]
    argv += ["-device", "virtio-rng-pci"]
    argv += ["-rtc", "base=utc"]
    argv += ["-display", "none"]
    if spec.interactive:
        argv += ["-serial", "mon:stdio"]
    else:
        argv += ["-serial", f"file:{spec.serial_log}"]
    argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    argv += list(spec.extra_args)
    return argv


def _escape(path: Path) -> str:
    """QEMU's -drive option syntax: a comma in a value is written twice."""
    return str(path).replace(",", ",,")


def qemu_binary(arch: Arch) -> str:
    return require_tool(QEMU_BINARY[arch], QEMU_PACKAGE[arch])


def qemu_version(binary: str) -> str:
    first = run([binary, "--version"], stage="qemu", timeout=30).stdout.splitlines()[0]
    return first.replace("QEMU emulator version ", "")


# --- running a VM -----------------------------------------------------------------------


class KvmNoProgressError(Exception):
    """The guest printed nothing under KVM in time: this host's KVM does not run guests."""


@dataclass(frozen=True)
class VmExit:
    seconds: float
    returncode: int


def serial_tail(log_file: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    try:
        text = log_file.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return "(no serial output)"
    text = text.replace("\r", "")
    return tail(text, lines) or "(no serial output)"


def qmp_command(socket_path: Path, command: str, timeout: float = 5.0) -> Any:
    """One QMP command over the VM's monitor socket (qemu.qmp's synchronous client)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(str(socket_path))
    try:
        qmp.settimeout(timeout)
        qmp.connect()
        return qmp.cmd(command)
    finally:
        qmp.close()


def graceful_stop(proc: subprocess.Popen[bytes], qmp_socket: Path, grace_s: float, log_stage: str) -> None:
    """ACPI power button through QMP, ``grace_s`` to shut down, then terminate and kill."""
    if proc.poll() is not None:
        return
    try:
        qmp_command(qmp_socket, "system_powerdown")
    except Exception:  # no monitor to ask: waiting would only delay the kill
        stop_process(proc)
        return
    stage_logger(log_stage).info("asked the guest to power down (ACPI); waiting up to %.0f s", grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    stop_process(proc)


class VmRun:
    """A VM started from a spec; ``wait`` polls it with a watchdog.

    Used as a context manager: whatever ends the block (success, error, timeout,
    Ctrl-C), QEMU is stopped and reaped, so no QEMU process survives a step.
    """

    def __init__(self, spec: VmSpec, binary: str, stage: str) -> None:
        self.spec, self.binary, self.stage = spec, binary, stage
        self.log = stage_logger(stage)
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned: Spawned | None = None
        self.started = 0.0
        self._stack = contextlib.ExitStack()
        self._socket_dir: Path | None = None
        self._stderr_file = spec.serial_log.with_name(spec.serial_log.stem + ".qemu-stderr.log")

    def __enter__(self) -> VmRun:
        if len(os.fsencode(self.spec.qmp_socket)) > UNIX_SOCKET_PATH_MAX:
            # Deep work folders overflow the socket path limit: use a private folder under the temp dir.
            import dataclasses
            import tempfile

            self._socket_dir = Path(tempfile.mkdtemp(prefix="cloudbake-"))
            self.spec = dataclasses.replace(self.spec, qmp_socket=self._socket_dir / "qmp.sock")
        self.spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
        # A new file, not a truncated one: a QEMU left over from an earlier boot keeps writing
        # into the old (unlinked) file and can never put its lines into this boot's log.
        self.spec.serial_log.unlink(missing_ok=True)
        self.spec.serial_log.write_bytes(b"")
        self.spec.qmp_socket.unlink(missing_ok=True)
        argv = build_qemu_argv(self.spec, self.binary)
        self.log.info("starting %s (accel %s, %d vCPU, %d MiB)", os.path.basename(self.binary), self.spec.accel,
                      self.spec.cpus, self.spec.memory_mib)
        self._stderr_file.unlink(missing_ok=True)
        stderr = self._stack.enter_context(open(self._stderr_file, "wb"))
        interactive = self.spec.interactive
        self.spawned = self._stack.enter_context(
            spawn(argv, stage=self.stage, stdout=None if interactive else subprocess.DEVNULL, stderr=stderr,
                  stdin=None if interactive else subprocess.DEVNULL, grace=5.0, new_session=not interactive))
        self.proc = self.spawned.proc
        self.started = time.monotonic()
        return self

    def keep_running(self) -> None:
        """The VM outlives this block (test-image keep=1)."""
        if self.spawned is not None:
            self.spawned.keep_running()

    @property
    def kept(self) -> bool:
        return self.spawned is not None and self.spawned.kept

    def __exit__(self, *exc: object) -> None:
        if self.kept:
            self._stack.close()
            return
        try:
            if self.proc is not None and self.proc.poll() is None:
                if isinstance(exc[0], type) and issubclass(exc[0], KeyboardInterrupt):
                    self._quit_now()
                else:
                    graceful_stop(self.proc, self.spec.qmp_socket, 10.0, self.stage)
        finally:
            self._stack.close()
            self.spec.qmp_socket.unlink(missing_ok=True)
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _quit_now(self) -> None:
        """Interrupted: no time for the guest to shut down. QMP quit, then terminate and kill."""
        assert self.proc is not None
        with contextlib.suppress(Exception):
            qmp_command(self.spec.qmp_socket, "quit", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3.0)
        stop_process(self.proc)

    def qemu_stderr(self) -> str:
        with contextlib.suppress(OSError):
            return tail(self._stderr_file.read_text(errors="replace"), 10)
        return ""

    def failure(self, message: str, hint: str | None = None) -> PipelineError:
        detail = f"{message}\n--- last lines of {self.spec.serial_log} ---\n{serial_tail(self.spec.serial_log)}"
        stderr = self.qemu_stderr()
        if stderr:
            detail += f"\n--- QEMU said ---\n{stderr}"
        return PipelineError(detail, hint=hint or f"the whole serial log is in {self.spec.serial_log}")

    def wait(self, timeout_s: float, *, progress_timeout_s: float | None = None,
             until: Callable[[], bool] | None = None, poll_s: float = 0.5) -> VmExit:
        """Until QEMU exits (or ``until()`` is true). Raises on timeout, or KvmNoProgressError when
        ``progress_timeout_s`` passes with no serial output at all."""
        assert self.proc is not None
        streamed = 0
        called = time.monotonic()
        next_heartbeat = called + HEARTBEAT_S
        while True:
            code = self.proc.poll()
            elapsed = time.monotonic() - self.started
            waited = time.monotonic() - called
            streamed = self._stream_serial(streamed)
            if code is not None:
                return VmExit(elapsed, code)
            if until is not None and until():
                return VmExit(elapsed, -1)
            if progress_timeout_s is not None and elapsed > progress_timeout_s and self.serial_size() == 0:
                raise KvmNoProgressError()
            if time.monotonic() >= next_heartbeat:
                self.log.info("guest running for %.0f s; console: %s", elapsed, self._last_serial_line())
                next_heartbeat += HEARTBEAT_S
            if waited > timeout_s:
                raise self.failure(f"the guest did not finish within {timeout_s:.0f} s; it was stopped",
                                   hint=f"raise vm.timeout if it was still working; serial log: "
                                        f"{self.spec.serial_log}")
            time.sleep(poll_s)

    def _last_serial_line(self) -> str:
        lines = serial_tail(self.spec.serial_log, 1)
        return lines[-120:]

    def serial_size(self) -> int:
        try:
            return self.spec.serial_log.stat().st_size
        except OSError:
            return 0

    def _stream_serial(self, offset: int) -> int:
        """At debug verbosity (CLOUDBAKE_VERBOSE=1), the serial console streams into the log live."""
        if not self.log.isEnabledFor(10):
            return offset
        try:
            with open(self.spec.serial_log, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return offset
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode(errors="replace").splitlines():
            self.log.debug("serial: %s", line.rstrip("\r"))
        return offset + end


@contextlib.contextmanager
def boot_with_fallback(spec: VmSpec, choice: AccelChoice, cache_dir: Path, stage: str,
                       progress_timeout_s: float = KVM_PROGRESS_TIMEOUT_S) -> Iterator[tuple[VmRun, AccelChoice]]:
    """Start the VM; when auto picked KVM, watch it first and fall back to TCG if KVM cannot run it.

    Hosts differ in how a broken KVM shows: on some the guest hangs without a byte on the
    console, on others QEMU aborts at once (``failed to set MSR``, an assertion in kvm.c),
    refuses ``-cpu host`` or cannot create the VM. Both end in TCG, with the verdict
    remembered in QEMU's own words. QEMU exiting for other reasons (a missing disk, a bad
    argument) is not a KVM verdict: the caller reports it as it is.

    Yields the running VM and the accelerator finally used. The caller ``wait``s on it.
    """
    import dataclasses

    binary = qemu_binary(spec.arch)
    log = stage_logger(stage)
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    if choice.probe:
        verdict: str | None = None
        vm = VmRun(spec, binary, stage)
        with vm:
            try:
                exit_ = vm.wait(progress_timeout_s, progress_timeout_s=progress_timeout_s,
                                until=lambda: vm.serial_size() > 0)
            except KvmNoProgressError:
                verdict = f"no output from the guest under KVM within {progress_timeout_s:.0f} s"
                if vm.proc is not None:
                    stop_process(vm.proc)
            else:
                if exit_.returncode != -1 and vm.serial_size() == 0:
                    verdict = kvm_failure_verdict(exit_.returncode, vm.qemu_stderr())
                if verdict is None:
                    yield vm, choice
                    return
        log.warning("KVM cannot run guests on this host (%s); falling back to TCG, remembered in %s",
                    verdict, kvm_verdict_file(cache_dir))
        remember_kvm_broken(cache_dir, verdict)
        choice = AccelChoice("tcg", f"KVM cannot run guests here ({verdict}): software emulation (TCG)")
        spec = dataclasses.replace(spec, accel="tcg")
    vm = VmRun(spec, binary, stage)
    with vm:
        yield vm, choice
