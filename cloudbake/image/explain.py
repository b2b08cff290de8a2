"""Words for what cloudbake runs: every QEMU argument it builds, and the sudoers rule it gives its user.

docs/guide.md renders its walk-throughs from these functions over the real argv builder
(`doit docs`), and a test fails when an argument has no explanation or the guide is stale:
the guide cannot drift from the command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloudbake.config.model import Arch
from cloudbake.image.seed import SUDO_NOPASSWD
from cloudbake.qemu.argv import VmSpec, build_qemu_argv


def _drive(value: str) -> str:
    if value.startswith("if=pflash") and "readonly=on" in value:
        return ("UEFI firmware code in the first flash chip, read-only: shared by every VM. QEMU's "
                "docs (system/i386/pc and arm/virt) describe pflash as how UEFI is given to a guest.")
    if value.startswith("if=pflash"):
        return ("The UEFI variable store in the second flash chip: this VM's own copy of the template, "
                "so boot entries the firmware writes never touch the shared file.")
    if "format=qcow2" in value:
        return ("The system disk, a qcow2 overlay, on virtio-blk. `discard=unmap` passes the guest's TRIM "
                "through so freed clusters leave the file; `detect-zeroes=unmap` turns written zeros into "
                "holes too (qemu-options: -drive).")
    return ("The NoCloud seed (an ISO 9660 image labelled `cidata`) as a second, read-only virtio disk: "
            "cloud-init's NoCloud datasource looks for the label, not for a CD-ROM drive.")


def _nic(value: str) -> str:
    text = ("User-mode networking (slirp): the guest gets NAT to the outside through the host's sockets, "
            "no root, no bridge. `model=virtio-net-pci` is the paravirtual NIC; `-nic` is shorthand for "
            "`-netdev user,id=n0 -device virtio-net-pci,netdev=n0` (qemu-options: -nic).")
    if "hostfwd" in value:
        text += " Each `hostfwd` binds 127.0.0.1 only: nothing outside the host can reach the guest."
    return text


def _serial(value: str) -> str:
    if value == "mon:stdio":
        return ("The serial console on the terminal with the QEMU monitor multiplexed in (Ctrl-A C "
                "switches, Ctrl-A X quits): `doit console`.")
    return ("The serial console (ttyS0 / ttyAMA0) into a file, kept whole: the bake reads cloud-init's "
            "verdict from it, and it is the first thing to read when a boot fails.")


# Option -> (value -> explanation). Every option build_qemu_argv emits must be here.
OPTIONS: dict[str, Callable[[str], str]] = {
    "-name": lambda v: "A name for the process list and the monitor.",
    "-machine": lambda v: (
        "The board. `virt` is QEMU's generic Arm board (no BIOS: firmware must be supplied); "
        "`highmem=on` lets RAM and PCI space sit above 4 GiB, which hvf supports since QEMU 7."
        if v.startswith("virt") else
        "The q35 chipset: a modern PC with PCIe (the default `pc` is the 1996 i440FX)."),
    "-accel": lambda v: {
        "tcg": "Software emulation (the Tiny Code Generator): any guest arch on any host, ten or more times slower.",
        "kvm": "Linux's hypervisor: guest code runs natively on the CPU.",
        "hvf": "Apple's Hypervisor.framework: guest code runs natively on Apple silicon.",
    }.get(v, "The accelerator."),
    "-cpu": lambda v: (
        "The host's own CPU model, passed through (only with kvm or hvf)." if v == "host" else
        "Every CPU feature TCG can emulate, with pointer authentication by a cheap implementation-defined "
        "algorithm instead of QARMA5 (arm64 guests boot much faster under TCG)." if "pauth-impdef" in v else
        "Every CPU feature TCG can emulate."),
    "-smp": lambda v: f"{v} virtual CPUs (vm.cpus).",
    "-m": lambda v: f"{v.removesuffix('M')} MiB of guest RAM (vm.memory).",
    "-nodefaults": lambda v: "No default devices (VGA, NIC, CD-ROM, floppy): the VM has exactly what follows.",
    "-no-reboot": lambda v: "A reboot ends QEMU instead of booting again: a guest that reboots mid-bake fails "
                            "fast instead of looping.",
    "-drive": _drive,
    "-nic": _nic,
    "-device": lambda v: "A paravirtual entropy source: the guest's first-boot key generation does not wait "
                         "for randomness.",
    "-rtc": lambda v: "The guest clock starts at the host's time in UTC (Linux guests expect UTC).",
    "-display": lambda v: "No window: headless.",
    "-serial": _serial,
    "-qmp": lambda v: "The QEMU Machine Protocol on a Unix socket: cloudbake asks QEMU what it runs "
                      "(`query-kvm`) and powers the VM off or saves its state through it.",
    "-incoming": lambda v: "Resume a saved VM (warm start) instead of booting.",
}


@dataclass(frozen=True)
class Argument:
    option: str
    value: str
    why: str


def explain_argv(argv: list[str]) -> list[Argument]:
    """Each option of a QEMU command line with its value and why it is there; KeyError for an unknown one."""
    out, index = [], 1
    while index < len(argv):
        option = argv[index]
        takes_value = index + 1 < len(argv) and not argv[index + 1].startswith("-")
        value = argv[index + 1] if takes_value else ""
        out.append(Argument(option, value, OPTIONS[option](value)))
        index += 2 if takes_value else 1
    return out


def example_specs() -> dict[str, tuple[VmSpec, str]]:
    """The commands the guide walks through: a bake on an Apple-silicon Mac (the draft's case) and on Linux CI."""
    brew = Path("/opt/homebrew/share/qemu")
    work = Path("build/ubuntu-noble")
    mac = VmSpec(name="ubuntu-noble", arch=Arch.arm64, accel="hvf", cpus=4, memory_mib=4096,
                 disk=work / "disk.qcow2", serial_log=work / "serial.log", qmp_socket=work / "qmp.sock",
                 seed=work / "seed.iso", firmware="uefi", firmware_code=brew / "edk2-aarch64-code.fd",
                 firmware_vars=work / "efivars.fd")
    linux = VmSpec(name="ubuntu-noble", arch=Arch.amd64, accel="tcg", cpus=2, memory_mib=2048,
                   disk=work / "disk.qcow2", serial_log=work / "serial.log", qmp_socket=work / "qmp.sock",
                   seed=work / "seed.iso", firmware="uefi",
                   firmware_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), firmware_vars=work / "efivars.fd")
    return {"mac": (mac, "qemu-system-aarch64"), "linux": (linux, "qemu-system-x86_64")}


def render_argv_table(spec: VmSpec, binary: str) -> str:
    argv = build_qemu_argv(spec, binary)
    rows = ["| argument | why |", "|---|---|"]
    for arg in explain_argv(argv):
        shown = f"{arg.option} {arg.value}".strip().replace("|", "\\|")
        rows.append(f"| `{shown}` | {arg.why} |")
    return f"`{binary}`, then:\n\n" + "\n".join(rows)


@dataclass(frozen=True)
class SudoersRule:
    user: str
    hosts: str
    runas: str
    tags: str
    commands: str


def parse_sudoers_rule(user: str, spec: str) -> SudoersRule:
    """cloud-init's ``sudo:`` value (``ALL=(ALL) NOPASSWD:ALL``) as the line it writes for ``user``.

    sudoers(5): ``user host_list = (runas_list) [tag:] command_list``.
    """
    hosts, _, rest = spec.partition("=")
    rest = rest.strip()
    runas = ""
    if rest.startswith("("):
        runas, _, rest = rest[1:].partition(")")
        rest = rest.strip()
    tags = ""
    while ":" in rest and rest.split(":", 1)[0].isupper() and rest.split(":", 1)[0].isalpha():
        tag, _, rest = rest.partition(":")
        tags += f"{tag}:"
    return SudoersRule(user, hosts.strip(), runas, tags, rest.strip())


def default_user() -> str:
    """``cloud_init.user``'s default, as the schema says it."""
    from cloudbake.config.problems import load_schema

    return str(load_schema()["properties"]["cloud_init"]["properties"]["user"]["default"])


GENERATED = {
    "argv-mac": lambda: render_argv_table(*example_specs()["mac"]),
    "argv-linux": lambda: render_argv_table(*example_specs()["linux"]),
    "sudoers": lambda: render_sudoers(default_user(), SUDO_NOPASSWD),
}


def fill_generated(text: str) -> str:
    """``text`` with every ``<!-- begin: NAME -->`` ... ``<!-- end: NAME -->`` block rendered afresh."""
    import re

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"<!-- begin: {name} (generated by `doit docs`) -->\n{GENERATED[name]()}\n<!-- end: {name} -->"

    return re.sub(r"<!-- begin: ([\w-]+)[^>]*-->.*?<!-- end: \1 -->", block, text, flags=re.S)


def render_sudoers(user: str, spec: str) -> str:
    rule = parse_sudoers_rule(user, spec)
    line = f"{rule.user} {rule.hosts}=({rule.runas}) {rule.tags}{rule.commands}"
    return "\n".join([
        f"cloud-init writes `/etc/sudoers.d/90-cloud-init-users` with the line `{line}`:",
        "",
        "| part | means |",
        "|---|---|",
        f"| `{rule.user}` | the one user the rule is for (`cloud_init.user`), not every user |",
        f"| `{rule.hosts}` before `=` | the host list: on any host this file is installed on |",
        f"| `({rule.runas})` | the users it may run commands as (`sudo -u NAME`; root by default) |",
        f"| `{rule.tags}` | a tag: no password is asked |",
        f"| `{rule.commands}` after the tag | the command list: any command |",
    ])
