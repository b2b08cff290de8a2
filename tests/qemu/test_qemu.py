"""QEMU command lines, accelerator choice and firmware discovery: pure logic, no guest boots.

macOS cannot run here: Darwin hosts are described by a Host value and Homebrew by a fake
tree of files, and that is all these tests claim to cover for macOS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudbake.config.model import Accel, Arch, Firmware
from cloudbake.core.errors import PipelineError
from cloudbake.qemu.argv import VmSpec, build_qemu_argv
from cloudbake.qemu.firmware import (
    AARCH64_PFLASH_BYTES,
    find_uefi,
    image_has_esp,
    pflash_code,
    prepare_vars,
    resolve_firmware,
)
from cloudbake.qemu.host import Host, choose_accel
from cloudbake.qemu.vmrun import KvmNoProgressError, VmRun

LINUX = Host("Linux", "x86_64", kvm_usable=True)
LINUX_NO_KVM = Host("Linux", "x86_64", kvm_usable=False)
MAC = Host("Darwin", "arm64", kvm_usable=False)


def _spec(**kw) -> VmSpec:
    base: dict = dict(name="t", arch=Arch.amd64, accel="tcg", cpus=2, memory_mib=2048, disk=Path("/w/disk.qcow2"),
                serial_log=Path("/w/serial.log"), qmp_socket=Path("/w/qmp.sock"), seed=Path("/w/seed.iso"),
                firmware="uefi", firmware_code=Path("/fw/CODE.fd"), firmware_vars=Path("/w/vars.fd"))
    base.update(kw)
    return VmSpec(**base)


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(1, len(argv) - 1) if argv[i].startswith("-")
            and not argv[i + 1].startswith("-")]


def test_amd64_tcg_argv_reads_like_the_command():
    argv = build_qemu_argv(_spec(), "qemu-system-x86_64")
    pairs = _pairs(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert ("-machine", "q35") in pairs and ("-accel", "tcg") in pairs and ("-cpu", "max") in pairs
    assert ("-smp", "2") in pairs and ("-m", "2048M") in pairs
    assert ("-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd") in pairs
    assert ("-drive", "if=pflash,format=raw,unit=1,file=/w/vars.fd") in pairs
    assert ("-drive", "file=/w/disk.qcow2,if=virtio,format=qcow2,discard=unmap,detect-zeroes=unmap") in pairs
    assert ("-drive", "file=/w/seed.iso,if=virtio,format=raw,readonly=on") in pairs
    assert ("-nic", "user,model=virtio-net-pci") in pairs
    assert ("-serial", "file:/w/serial.log") in pairs and ("-display", "none") in pairs
    assert ("-qmp", "unix:/w/qmp.sock,server=on,wait=off") in pairs
    assert "-no-reboot" in argv and "-kernel" not in argv


def test_ssh_forward_is_bound_to_loopback():
    argv = build_qemu_argv(_spec(ssh_port=2222), "q")
    assert "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22" in argv


def test_kvm_uses_host_cpu_and_bios_has_no_pflash():
    argv = build_qemu_argv(_spec(accel="kvm", firmware="bios"), "q")
    assert ("-cpu", "host") in _pairs(argv)
    assert not any(a.startswith("if=pflash") for a in argv)


def test_arm64_hvf_argv_matches_apple_silicon_recipe():
    argv = build_qemu_argv(_spec(arch=Arch.arm64, accel="hvf"), "qemu-system-aarch64")
    pairs = _pairs(argv)
    assert ("-machine", "virt,highmem=on") in pairs and ("-accel", "hvf") in pairs and ("-cpu", "host") in pairs
    assert ("-nic", "user,model=virtio-net-pci") in pairs


def test_arm64_tcg_uses_max_cpu_with_cheap_pointer_authentication_on_virt():
    pairs = _pairs(build_qemu_argv(_spec(arch=Arch.arm64, accel="tcg"), "q"))
    assert ("-machine", "virt") in pairs and ("-cpu", "max,pauth-impdef=on") in pairs


def test_this_qemu_accepts_the_arm64_tcg_cpu():
    """The CPU argument is real QEMU's: qemu-system-aarch64 starts with it (paused, no guest)."""
    binary = shutil.which("qemu-system-aarch64")
    if binary is None:
        pytest.skip("qemu-system-aarch64 is not installed")
    cpu = dict(_pairs(build_qemu_argv(_spec(arch=Arch.arm64, accel="tcg"), "q")))["-cpu"]
    proc = subprocess.run([binary, "-machine", "virt", "-accel", "tcg", "-cpu", cpu, "-display", "none", "-S",
                           "-nodefaults", "-qmp", "stdio"], input='{"execute": "qmp_capabilities"}\n'
                          '{"execute": "quit"}\n', capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_commas_in_paths_are_escaped():
    argv = build_qemu_argv(_spec(disk=Path("/a,b/disk.qcow2")), "q")
    assert any(a.startswith("file=/a,,b/disk.qcow2,") for a in argv)


def test_extra_args_come_last():
    assert build_qemu_argv(_spec(extra_args=("-device", "foo")), "q")[-2:] == ["-device", "foo"]


@pytest.mark.parametrize(("requested", "guest", "host", "accel", "probe"), [
    (Accel.auto, Arch.amd64, LINUX, "kvm", True),
    (Accel.auto, Arch.amd64, LINUX_NO_KVM, "tcg", False),
    (Accel.auto, Arch.arm64, LINUX, "tcg", False),
    (Accel.auto, Arch.arm64, MAC, "hvf", False),
    (Accel.auto, Arch.amd64, MAC, "tcg", False),
    (Accel.tcg, Arch.amd64, LINUX, "tcg", False),
    (Accel.kvm, Arch.amd64, LINUX, "kvm", False),
    (Accel.hvf, Arch.arm64, MAC, "hvf", False),
])
def test_accel_choice(requested, guest, host, accel, probe):
    choice = choose_accel(requested, guest, host)
    assert (choice.accel, choice.probe) == (accel, probe)
    assert choice.reason


def test_remembered_kvm_verdict_skips_the_probe():
    """The verdict in full is said once, when it is seen (and by `cloudbake status`); later commands say one
    short line."""
    verdict = "QEMU died of SIGABRT under KVM before the guest printed anything: " + "x" * 300 + "; seen 2026-11-27"
    choice = choose_accel(Accel.auto, Arch.amd64, LINUX, kvm_verdict=verdict)
    assert choice.accel == "tcg" and not choice.probe
    assert "remembered" in choice.reason and "seen 2026-11-27" not in choice.reason and len(choice.reason) < 120


@pytest.mark.parametrize(("requested", "guest", "host", "fragment"), [
    (Accel.kvm, Arch.amd64, LINUX_NO_KVM, "/dev/kvm cannot be opened"),
    (Accel.kvm, Arch.arm64, LINUX, "cannot run a arm64 guest"),
    (Accel.kvm, Arch.arm64, MAC, "needs a Linux host"),
    (Accel.hvf, Arch.amd64, LINUX, "needs macOS"),
    (Accel.hvf, Arch.amd64, MAC, "needs macOS and a guest of the host's arch"),
])
def test_impossible_accel_is_a_clear_error(requested, guest, host, fragment):
    with pytest.raises(PipelineError, match=fragment):
        choose_accel(requested, guest, host)


# --- firmware --------------------------------------------------------------------------

def _descriptor(folder: Path, name: str, arch: str, code: Path, vars_: Path, features=()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({
        "interface-types": ["uefi"],
        "mapping": {"device": "flash", "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(vars_), "format": "raw"}},
        "targets": [{"architecture": arch, "machines": ["virt-*"]}],
        "features": list(features),
    }))


def test_fake_homebrew_tree_is_found_for_arm64(tmp_path, monkeypatch):
    """A Homebrew layout (as on an Apple-silicon Mac) built from files: descriptor first, then known names."""
    import cloudbake.qemu.firmware as qemu
    monkeypatch.setattr(qemu, "SYSTEM_DESCRIPTOR_DIRS", ())
    prefix = tmp_path / "homebrew"
    share = prefix / "share" / "qemu"
    share.mkdir(parents=True)
    code, vars_ = share / "edk2-aarch64-code.fd", share / "edk2-arm-vars.fd"
    code.write_bytes(b"\0" * 1024)
    vars_.write_bytes(b"\0" * 1024)
    mac = Host("Darwin", "arm64", kvm_usable=False, homebrew_prefix=prefix)
    found = find_uefi(Arch.arm64, mac, home=tmp_path / "home")
    assert (found.code, found.vars_template) == (code, vars_)
    _descriptor(share / "firmware", "60-edk2-aarch64.json", "aarch64", code, vars_)
    assert find_uefi(Arch.arm64, mac, home=tmp_path / "home").source.endswith("60-edk2-aarch64.json")


def test_descriptor_precedence_and_secure_boot_skipped(tmp_path, monkeypatch):
    import cloudbake.qemu.firmware as qemu
    monkeypatch.setattr(qemu, "SYSTEM_DESCRIPTOR_DIRS", (tmp_path / "usr-share", tmp_path / "etc"))
    fw = tmp_path / "fw"
    fw.mkdir()
    for name in ("secure.fd", "plain.fd", "user.fd", "vars.fd"):
        (fw / name).write_bytes(b"x")
    home = tmp_path / "home"
    prefix = tmp_path / "brew"
    host = Host("Darwin", "x86_64", kvm_usable=False, homebrew_prefix=prefix)
    system = prefix / "share" / "qemu" / "firmware"
    _descriptor(system, "40-secure.json", "x86_64", fw / "secure.fd", fw / "vars.fd", features=["secure-boot"])
    _descriptor(system, "60-plain.json", "x86_64", fw / "plain.fd", fw / "vars.fd")
    assert find_uefi(Arch.amd64, host, home=home).code == fw / "plain.fd"
    _descriptor(home / ".config" / "qemu" / "firmware", "60-plain.json", "x86_64", fw / "user.fd", fw / "vars.fd")
    assert find_uefi(Arch.amd64, host, home=home).code == fw / "user.fd"


def test_missing_firmware_names_the_package(tmp_path, monkeypatch):
    import cloudbake.qemu.firmware as qemu

    monkeypatch.setattr(qemu, "descriptor_dirs", lambda host, home=None: [])
    monkeypatch.setattr(qemu, "known_uefi_paths", lambda arch, host: [(tmp_path / "no", tmp_path / "no2")])
    with pytest.raises(PipelineError, match="apt install qemu-efi-aarch64"):
        find_uefi(Arch.arm64, LINUX)
    with pytest.raises(PipelineError, match="brew install qemu"):
        find_uefi(Arch.arm64, MAC)


def test_arm64_pflash_is_padded_to_64_mib(tmp_path):
    from cloudbake.qemu.firmware import FirmwareFiles
    code, vars_ = tmp_path / "code.fd", tmp_path / "vars.fd"
    code.write_bytes(b"C" * 2048)
    vars_.write_bytes(b"V" * 2048)
    files = FirmwareFiles(code, vars_)
    padded = pflash_code(files, Arch.arm64, tmp_path / "cache")
    assert padded.stat().st_size == AARCH64_PFLASH_BYTES and padded.read_bytes()[:2048] == b"C" * 2048
    copy = prepare_vars(files, Arch.arm64, tmp_path / "vm" / "vars.fd")
    assert copy.stat().st_size == AARCH64_PFLASH_BYTES
    assert vars_.stat().st_size == 2048  # the template is never written
    assert pflash_code(files, Arch.amd64, tmp_path / "cache") == code


def test_firmware_resolution():
    assert resolve_firmware(Firmware.auto, Arch.arm64, None) == "uefi"
    assert resolve_firmware(Firmware.bios, Arch.amd64, None) == "bios"
    with pytest.raises(PipelineError, match="bios is not possible for arm64"):
        resolve_firmware(Firmware.bios, Arch.arm64, None)


def test_esp_detection_reads_the_gpt(tmp_path):
    """A real GPT made by sfdisk, wrapped in qcow2 by qemu-img: with and without an ESP."""
    import shutil
    import subprocess
    if not shutil.which("sfdisk"):
        pytest.skip("needs fdisk")
    for table, expected in (("type=U, size=2M\ntype=L\n", True), ("type=L\n", False)):
        raw = tmp_path / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(["sfdisk", "-q", str(raw)], input=f"label: gpt\n{table}".encode(), check=True)
        qcow = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
        assert image_has_esp(qcow) is expected
        assert resolve_firmware(Firmware.auto, Arch.amd64, qcow) == ("uefi" if expected else "bios")


# --- the watchdog, with the real interpreter as a fake QEMU --------------------------------

def test_silent_guest_counts_as_no_progress(tmp_path, monkeypatch):
    """A 'QEMU' that never writes to its serial log: the progress watchdog fires and the process is gone."""
    spec = _spec(serial_log=tmp_path / "serial.log", qmp_socket=tmp_path / "qmp.sock")
    fake = [sys.executable, "-c", "import time; time.sleep(60)"]
    vm = VmRun(spec, "unused", "bake")
    import cloudbake.qemu.vmrun as qemu
    monkeypatch.setattr(qemu, "build_qemu_argv", lambda spec, binary: fake)
    with pytest.raises(KvmNoProgressError), vm:
        vm.wait(30, progress_timeout_s=1.0, poll_s=0.1)
    assert vm.proc is not None and vm.proc.poll() is not None


def test_timeout_stops_the_guest_and_shows_the_serial_tail(tmp_path, monkeypatch):
    import cloudbake.qemu.vmrun as qemu
    log_file = tmp_path / "serial.log"
    spec = _spec(serial_log=log_file, qmp_socket=tmp_path / "qmp.sock")
    script = f"import time\nopen({str(log_file)!r}, 'a').write('booting...\\nstuck here\\n')\ntime.sleep(60)\n"
    monkeypatch.setattr(qemu, "build_qemu_argv", lambda spec, binary: [sys.executable, "-c", script])
    vm = VmRun(spec, "unused", "bake")
    with pytest.raises(PipelineError) as caught, vm:
        vm.wait(1.5, poll_s=0.1)
    assert "did not finish within 2 s" in str(caught.value)
    assert "stuck here" in str(caught.value) and str(log_file) in str(caught.value)
    assert vm.proc is not None and vm.proc.poll() is not None


def test_long_socket_paths_move_to_a_private_short_folder(tmp_path, monkeypatch):
    """Unix socket paths are limited to 107 bytes; deep work folders must still boot."""
    import cloudbake.qemu.vmrun as qemu
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    seen = []

    def fake_argv(spec, binary):
        seen.append(spec.qmp_socket)
        return [sys.executable, "-c", "import time; time.sleep(30)"]

    monkeypatch.setattr(qemu, "build_qemu_argv", fake_argv)
    vm = VmRun(_spec(serial_log=deep / "serial.log", qmp_socket=deep / "qmp.sock"), "unused", "bake")
    with vm:
        assert len(str(seen[0])) <= 107 and seen[0].parent.stat().st_mode & 0o077 == 0
    assert not seen[0].parent.exists()


# --- every broken KVM, with stand-in QEMU programs first on PATH ----------------------------

BROKEN_KVM = [
    ("abort", "failed to set MSR 0x10a"),
    ("abort", "SIGABRT"),
    ("hang", "no output from the guest under KVM"),
    ("cpu-host-refused", "requires KVM"),
    ("create-vm-fails", "KVM_CREATE_VM"),
]


def _standin_boot(tmp_path, monkeypatch, mode: str):
    from cloudbake.qemu.host import AccelChoice
    from cloudbake.qemu.vmrun import boot_with_fallback
    from tests.fixture.standin import install_standin_qemu, path_with

    monkeypatch.setenv("PATH", path_with(install_standin_qemu(tmp_path / "bin", mode)))
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("CLOUDBAKE_STANDIN_CALLS", str(calls))
    spec = _spec(serial_log=tmp_path / "serial.log", qmp_socket=tmp_path / "qmp.sock", firmware="bios",
                 accel="kvm", disk=tmp_path / "disk.qcow2")
    choice = AccelChoice("kvm", "/dev/kvm is usable", probe=True)
    with boot_with_fallback(spec, choice, tmp_path / "cache", "bake", progress_timeout_s=2.0) as (vm, used):
        exit_ = vm.wait(30, poll_s=0.1)
    return used, exit_, calls.read_text().split(), tmp_path / "serial.log"


@pytest.mark.parametrize(("mode", "words"), BROKEN_KVM)
def test_broken_kvm_falls_back_to_tcg_and_remembers_why(tmp_path, monkeypatch, capsys, mode, words):
    from cloudbake.qemu.host import kvm_verdict_file, read_kvm_verdict

    used, exit_, calls, serial = _standin_boot(tmp_path, monkeypatch, mode)
    assert calls == ["kvm", "tcg"]
    assert used.accel == "tcg" and words in used.reason
    assert exit_.returncode == 0 and "accel tcg" in serial.read_text()
    verdict = read_kvm_verdict(tmp_path / "cache")
    assert verdict is not None and words in verdict
    assert json.loads(kvm_verdict_file(tmp_path / "cache").read_text())["verdict"] in verdict
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "falling back to TCG" in warnings[0] and words in warnings[0]
    # The next start on this host does not probe again.
    again = choose_accel(Accel.auto, Arch.amd64, LINUX, verdict)
    assert again.accel == "tcg" and not again.probe and words not in again.reason and "remembered" in again.reason


def test_working_kvm_is_kept(tmp_path, monkeypatch):
    from cloudbake.qemu.host import read_kvm_verdict

    used, exit_, calls, serial = _standin_boot(tmp_path, monkeypatch, "works")
    assert calls == ["kvm"] and used.accel == "kvm" and exit_.returncode == 0
    assert "accel kvm" in serial.read_text()
    assert read_kvm_verdict(tmp_path / "cache") is None


def test_a_qemu_failure_unrelated_to_kvm_is_not_a_kvm_verdict(tmp_path, monkeypatch):
    """A missing disk fails under TCG too: no fallback, no remembered verdict, QEMU's words reach the user."""
    from cloudbake.qemu.host import read_kvm_verdict

    used, exit_, calls, serial = _standin_boot(tmp_path, monkeypatch, "bad-disk")
    assert calls == ["kvm"] and used.accel == "kvm" and exit_.returncode == 1
    assert read_kvm_verdict(tmp_path / "cache") is None


@pytest.mark.parametrize(("returncode", "stderr", "broken"), [
    (-6, "", True),
    (-11, "", True),
    (1, "qemu-system-x86_64: failed to initialize kvm: Permission denied", True),
    (1, "qemu-system-x86_64: -drive file=x: Could not open 'x'", False),
    (1, "qemu-system-x86_64: -nic user,hostfwd=tcp:127.0.0.1:2222-:22: could not set up host forwarding rule", False),
])
def test_kvm_failure_verdict_reads_qemu_words(returncode, stderr, broken):
    from cloudbake.qemu.host import kvm_failure_verdict

    assert (kvm_failure_verdict(returncode, stderr) is not None) is broken


def test_corrupt_verdict_file_means_probe_again(tmp_path):
    from cloudbake.qemu.host import kvm_verdict_file, read_kvm_verdict

    for text in ("{", "[]", '{"host": 3}', "\xff"):
        kvm_verdict_file(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        kvm_verdict_file(tmp_path).write_text(text)
        assert read_kvm_verdict(tmp_path) is None


def test_a_guest_that_powers_off_under_no_shutdown_ends_the_wait_at_once(tmp_path, monkeypatch):
    """-no-shutdown keeps QEMU up after the guest powers off: QMP says so, the wait ends, quit ends QEMU."""
    from tests.fixture.standin import install_qmp_standin

    binary = install_qmp_standin(tmp_path / "bin") / "qemu-system-x86_64"
    monkeypatch.setenv("CLOUDBAKE_STANDIN_SHUTDOWN_AFTER", "1")
    spec = _spec(serial_log=tmp_path / "serial.log", qmp_socket=tmp_path / "qmp.sock", extra_args=("-no-shutdown",))
    with VmRun(spec, str(binary), "bake") as vm:
        exit_ = vm.wait(600, watch_power_off=True, poll_s=0.1)
        assert exit_.powered_off and vm.proc is not None and vm.proc.poll() is None, "QEMU itself is still up"
        vm.quit_now()
        assert vm.proc.poll() == 0


def test_a_failed_guest_under_no_shutdown_is_kept_up_with_its_monitor_named(tmp_path, monkeypatch):
    import os
    import signal

    from tests.fixture.standin import install_qmp_standin

    binary = install_qmp_standin(tmp_path / "bin") / "qemu-system-x86_64"
    monkeypatch.setenv("CLOUDBAKE_STANDIN_SHUTDOWN_AFTER", "0.5")
    spec = _spec(serial_log=tmp_path / "serial.log", qmp_socket=tmp_path / "qmp.sock", extra_args=("-no-shutdown",))
    vm = VmRun(spec, str(binary), "bake")
    with vm:
        assert vm.wait(600, watch_power_off=True, poll_s=0.1).powered_off
        message = vm.keep_for_inspection()
    assert vm.proc is not None
    try:
        assert vm.proc.poll() is None, "kept running after the block"
        assert str(tmp_path / "qmp.sock") in message and f"kill {vm.proc.pid}" in message
        assert (tmp_path / "qmp.sock").exists()
    finally:
        os.kill(vm.proc.pid, signal.SIGKILL)
        vm.proc.wait()


def test_one_function_gives_the_bake_the_test_vm_and_the_warm_key_their_shape(make_pipeline):
    """vm.* becomes a VM's shape in one place: the bake's adds bake_qemu_args; a test VM's and the warm key's
    are the same shape, so a set saved from a real test VM is the one its key names."""
    import dataclasses
    from pathlib import Path

    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.qemu.argv import machine_shape
    from cloudbake.run.warm import warm_inputs

    pipeline = load_pipeline(make_pipeline("name: shape\nvm: {cpus: 3, memory: 1536M, qemu_args: [-nodefaults], "
                                           "bake_qemu_args: [-no-shutdown]}\n"))
    bake = machine_shape(pipeline, "tcg", "bios", bake=True)
    test = machine_shape(pipeline, "tcg", "bios")
    assert (bake.cpus, bake.memory_mib, bake.extra_args) == (3, 1536, ("-nodefaults", "-no-shutdown"))
    assert test.extra_args == ("-nodefaults",) and test.name == "shape-test"
    real_vm = dataclasses.replace(test, disk=Path("/runs/r1/disk.qcow2"), serial_log=Path("/runs/r1/serial.log"),
                                  ssh_port=2222, forwards=((8080, 80),))
    assert warm_inputs(real_vm, "7.2", "img") == warm_inputs(test, "7.2", "img")
