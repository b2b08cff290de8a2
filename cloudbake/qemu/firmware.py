"""UEFI firmware for QEMU: found through QEMU's descriptors or known paths, padded for arm64,
a private vars copy per VM."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cloudbake.config.model import Arch, Firmware
from cloudbake.core.errors import PipelineError
from cloudbake.core.runner import run
from cloudbake.core.tools import require_tool
from cloudbake.qemu.argv import VmSpec
from cloudbake.qemu.host import QEMU_ARCH, Host

FIRMWARE_PACKAGE = {Arch.amd64: "ovmf", Arch.arm64: "qemu-efi-aarch64"}


AARCH64_PFLASH_BYTES = 64 << 20


ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


SYSTEM_DESCRIPTOR_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))


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

    files = find_uefi(spec.arch, host)
    return dataclasses.replace(spec, firmware_code=pflash_code(files, spec.arch, cache_dir),
                               firmware_code_format=files.code_format,
                               firmware_vars=prepare_vars(files, spec.arch, vars_dest),
                               firmware_vars_format=files.vars_format)


def image_has_esp(image: Path) -> bool:
    """True when the disk image's GPT has an EFI system partition (read through qemu-img, no mounts)."""
    import tempfile
    import uuid

    qemu_img = require_tool("qemu-img")
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
