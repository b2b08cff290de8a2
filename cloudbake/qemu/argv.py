"""The QEMU command line: a VM spec and the pure function that turns it into argv."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cloudbake.config.model import Arch, Pipeline


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
    forwards: tuple[tuple[int, int], ...] = ()  # (host, guest) TCP ports, from 127.0.0.1 only
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    interactive: bool = False               # serial console on the terminal (doit console)
    incoming: str | None = None             # resume from a saved state (warm start): a migration URI
    key_channel: Path | None = None         # a virtio-serial port on this unix socket (warm start's key hand-over)


KEY_PORT_NAME = "dev.cloudbake.key"


def machine_shape(pipeline: Pipeline, accel: str, firmware: str, *, bake: bool = False) -> VmSpec:
    """The one function that turns ``pipeline.vm`` into a VM's shape: the bake's, a test run's and the warm
    key's (a saved state resumes only on the same shape, so all three must agree). Paths are placeholders
    each caller replaces with its own files; ``bake`` adds ``vm.bake_qemu_args`` and names the VM after the
    image instead of its test VMs."""
    vm = pipeline.vm
    return VmSpec(
        name=pipeline.name if bake else f"{pipeline.name}-test",
        arch=pipeline.source.arch,
        accel=accel,
        cpus=vm.cpus,
        memory_mib=vm.memory_bytes >> 20,
        disk=Path("disk.qcow2"),
        serial_log=Path("serial.log"),
        qmp_socket=Path("qmp.sock"),
        firmware=firmware,
        extra_args=(*vm.qemu_args, *vm.bake_qemu_args) if bake else vm.qemu_args,
    )


def machine_for(spec: VmSpec) -> str:
    if spec.arch is Arch.arm64:
        # highmem is needed for more than a few GiB of RAM and PCI space above 4 GiB; hvf
        # on Apple silicon supports it since QEMU 7.
        return "virt,highmem=on" if spec.accel == "hvf" else "virt"
    return "q35"


def cpu_for(spec: VmSpec) -> str:
    if spec.accel in ("kvm", "hvf"):
        return "host"
    if spec.arch is Arch.arm64:
        # arm64 kernels sign return addresses with pointer authentication; TCG computes QEMU's
        # default algorithm (QARMA5) in software on every signed call. An implementation-defined
        # algorithm is as good to the guest and far cheaper (docs/how-it-works.md, "Bake time").
        return "max,pauth-impdef=on"
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
    for host_port, guest_port in spec.forwards:
        nic += f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
    argv += ["-nic", nic]
    argv += ["-device", "virtio-rng-pci"]
    if spec.key_channel is not None:
        # The port a warm VM's listener reads this run's public key from (warm.py): no secret
        # needs to travel with a saved state to log in to it.
        argv += ["-device", "virtio-serial-pci,id=cbserial"]
        argv += ["-chardev", f"socket,id=cbkey,path={_escape(spec.key_channel)},server=on,wait=off"]
        argv += ["-device", f"virtserialport,bus=cbserial.0,chardev=cbkey,name={KEY_PORT_NAME}"]
    argv += ["-rtc", "base=utc"]
    argv += ["-display", "none"]
    if spec.interactive:
        argv += ["-serial", "mon:stdio"]
    else:
        argv += ["-serial", f"file:{spec.serial_log}"]
    argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    argv += list(spec.extra_args)
    return argv


def _escape(path: Path) -> str:
    """QEMU's -drive option syntax: a comma in a value is written twice."""
    return str(path).replace(",", ",,")
