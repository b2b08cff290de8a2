"""Warm start: what a saved state depends on, and how sets are found, checked, kept and refused.

Real guests resuming from one: tests/e2e/test_warm.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cloudbake.config.model import Arch
from cloudbake.core.errors import PipelineError
from cloudbake.qemu.argv import VmSpec, build_qemu_argv
from cloudbake.run.warm import find_warm_set, warm_inputs, warm_key, warm_set_for


def _spec(tmp_path: Path, **changes) -> VmSpec:
    code = tmp_path / "CODE.fd"
    if not code.exists():
        code.write_bytes(b"\0" * 4096)
    spec = VmSpec(name="t", arch=Arch.amd64, accel="tcg", cpus=2, memory_mib=1024, disk=tmp_path / "d.qcow2",
                  serial_log=tmp_path / "s.log", qmp_socket=tmp_path / "q.sock", seed=tmp_path / "seed.iso",
                  firmware="uefi", firmware_code=code, firmware_vars=tmp_path / "vars.fd", ssh_port=2222)
    return dataclasses.replace(spec, **changes)


def test_the_key_changes_with_everything_the_state_depends_on(tmp_path):
    base = warm_key(warm_inputs(_spec(tmp_path), "7.2.0", "abc"))
    for changed in ({"memory_mib": 1536}, {"cpus": 4}, {"accel": "kvm"}, {"arch": Arch.arm64},
                    {"extra_args": ("-device", "virtio-balloon")}, {"firmware": "bios"}):
        assert warm_key(warm_inputs(_spec(tmp_path, **changed), "7.2.0", "abc")) != base, changed
    assert warm_key(warm_inputs(_spec(tmp_path), "8.0.0", "abc")) != base
    assert warm_key(warm_inputs(_spec(tmp_path), "7.2.0", "abd")) != base
    # A restore may use other paths and ports: the same state serves every run.
    moved = _spec(tmp_path, disk=tmp_path / "other.qcow2", ssh_port=3333, serial_log=tmp_path / "x.log",
                  forwards=((18080, 8080),))
    assert warm_key(warm_inputs(moved, "7.2.0", "abc")) == base


def test_a_set_for_another_memory_size_is_not_found(tmp_path):
    image = tmp_path / "dist" / "img-0123.qcow2"
    image.parent.mkdir()
    built = warm_set_for(image, warm_key(warm_inputs(_spec(tmp_path), "7.2.0", "abc")))
    built.folder.mkdir(parents=True)
    built.meta.write_text("{}")
    assert find_warm_set(image, warm_key(warm_inputs(_spec(tmp_path), "7.2.0", "abc"))) == built
    assert find_warm_set(image, warm_key(warm_inputs(_spec(tmp_path, memory_mib=1536), "7.2.0", "abc"))) is None


def test_a_restore_is_the_same_command_line_plus_incoming(tmp_path):
    cold = build_qemu_argv(_spec(tmp_path), "qemu-system-x86_64")
    warm = build_qemu_argv(_spec(tmp_path, incoming="exec:zstd -d -c state.zst"), "qemu-system-x86_64")
    assert warm[:len(cold)] == cold and warm[len(cold):] == ["-incoming", "exec:zstd -d -c state.zst"]


# --- real guests ------------------------------------------------------------------------------


def test_sets_of_pruned_images_go_and_builds_in_progress_stay(tmp_path):
    import os

    from cloudbake.run.warm import sweep_orphans, warm_root

    dist = tmp_path / "dist"
    dist.mkdir()
    image = dist / "img-0123.qcow2"
    image.write_bytes(b"")
    root = warm_root(image)
    kept, pruned, half_dead = root / "img-0123-aaaa", root / "img-9999-bbbb", root / "img-0123-cccc"
    for folder in (kept, pruned, half_dead):
        folder.mkdir(parents=True)
    (kept / "warm.json").write_text("{}")
    (pruned / "warm.json").write_text("{}")
    building, lock = root / ".img-0123-dddd.partial", root / ".img-0123-dddd.lock"
    building.mkdir()
    lock.write_text("")
    hour_ago = time.time() - 7200
    os.utime(half_dead, (hour_ago, hour_ago))
    sweep_orphans(image)
    assert sorted(p.name for p in root.iterdir()) == sorted([kept.name, building.name, lock.name])


def test_a_rebake_under_the_same_key_names_another_warm_set(tmp_path):
    """--force, -a, or a clean then a pull: same key, other bytes; a state of the old bytes must not resume."""
    from cloudbake.image.store import read_manifest
    from cloudbake.run.warm import image_identity
    from tests.fixture.published import make_published

    first = read_manifest(make_published(tmp_path / "a", seed=b"first"))
    again = read_manifest(make_published(tmp_path / "b", seed=b"second"))
    assert first.key == again.key and first.image_sha256 != again.image_sha256
    keys = {warm_key(warm_inputs(_spec(tmp_path), "7.2.0", image_identity(m))) for m in (first, again)}
    assert len(keys) == 2
    # A layer: the same layer bytes over a rebaked parent is another image too.
    layer = dataclasses.replace(first, document={**first.document, "parent": {"sha256": "1" * 64}})
    other_parent = dataclasses.replace(first, document={**first.document, "parent": {"sha256": "2" * 64}})
    assert image_identity(layer) != image_identity(other_parent) != image_identity(first)


# --- portable, checked, remembered ---------------------------------------------------------------


def test_the_host_cpu_counts_under_kvm_and_hvf_only(tmp_path):
    intel = {"model": "Intel Xeon", "id": "aaaa"}
    epyc = {"model": "AMD EPYC", "id": "bbbb"}
    for accel in ("kvm", "hvf"):
        spec = _spec(tmp_path, accel=accel)
        assert warm_key(warm_inputs(spec, "7.2.0", "abc", intel)) != warm_key(warm_inputs(spec, "7.2.0", "abc", epyc))
    tcg = _spec(tmp_path)
    assert warm_key(warm_inputs(tcg, "7.2.0", "abc", intel)) == warm_key(warm_inputs(tcg, "7.2.0", "abc", epyc))


def test_host_cpu_identity_reads_cpuinfo(tmp_path):
    from cloudbake.qemu.host import cpu_identity, host_cpu_identity

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) 8375C\n"
                    "flags\t\t: sse avx2 fpu\n\nprocessor\t: 1\nflags\t\t: other\n")
    first = cpu_identity(info)
    info.write_text(info.read_text().replace("avx2 ", ""))
    assert first["model"] == "Intel(R) Xeon(R) 8375C" and cpu_identity(info)["id"] != first["id"]
    assert host_cpu_identity()["id"], "this machine's own CPU has an identity"


def _forged_set(image: Path, inputs: dict, **record) -> Path:
    folder = image.parent / ".warm" / f"{image.stem}-{warm_key(inputs)}"
    folder.mkdir(parents=True)
    (folder / "warm.json").write_text(json.dumps({"inputs": inputs, **record}))
    return folder


def test_a_set_saved_on_another_cpu_is_never_resumed_and_says_so(tmp_path):
    from cloudbake.run.warm import saved_on_another_cpu

    image = tmp_path / "dist" / "img-0123.qcow2"
    image.parent.mkdir()
    spec = _spec(tmp_path, accel="kvm")
    theirs = warm_inputs(spec, "7.2.0", "abc", {"model": "AMD EPYC 7763", "id": "epyc"})
    _forged_set(image, theirs, host_cpu_model="AMD EPYC 7763")
    mine = warm_inputs(spec, "7.2.0", "abc", {"model": "Intel Xeon", "id": "xeon"})
    assert find_warm_set(image, warm_key(mine)) is None
    other = saved_on_another_cpu(image, mine)
    assert other is not None and other["host_cpu_model"] == "AMD EPYC 7763"
    # A set for another memory size is just another set, not another CPU.
    assert saved_on_another_cpu(image, warm_inputs(_spec(tmp_path, accel="kvm", memory_mib=4096), "7.2.0", "abc",
                                                   {"model": "Intel Xeon", "id": "xeon"})) is None


def _kept_set(tmp_path: Path):
    """A warm set kept from a run folder over a real qcow2 base, its record naming the inputs of its key."""
    from cloudbake.run.warm import WarmSet, keep_as_warm_set, verify_set, warm_key

    base = tmp_path / "dist" / "img-0123.qcow2"
    work = tmp_path / "dist" / ".runs" / "r1"
    work.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "../../img-0123.qcow2",
                    str(work / "disk.qcow2")], check=True)
    for name in ("seed.iso", "state.zst", "vars.fd"):
        (work / name).write_bytes(os.urandom(4096))
    inputs = {"accel": "tcg", "memory_mib": 1024}
    warm = WarmSet(tmp_path / "dist" / ".warm" / f"img-0123-{warm_key(inputs)}")
    warm.folder.parent.mkdir(parents=True)
    keep_as_warm_set(warm, work / "disk.qcow2", work / "vars.fd", work / "seed.iso", work / "state.zst",
                     {"inputs": inputs, "accel": "tcg", "host_public": HOST_PUBLIC})
    verify_set(warm, base)
    return base, warm


def test_an_altered_state_is_refused_by_its_digest(tmp_path):
    from cloudbake.run.warm import verify_set

    base, warm = _kept_set(tmp_path)
    state = warm.state
    state.chmod(0o644)
    data = bytearray(state.read_bytes())
    data[100] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="state.zst does not match the SHA-256 its record holds"):
        verify_set(warm, base)


HOST_PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPseedtestkeyseedtestkeyseedtestkeyseedtest cloudbake-host"


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda record: record["inputs"].update(accel="kvm"), "not the ones the set is named by"),
    (lambda record: record.update(accel="kvm", inputs={**record["inputs"], "accel": "kvm"}),
     "not the ones the set is named by"),
    (lambda record: record.update(host_public=HOST_PUBLIC + "\n[127.0.0.1]:22 ssh-ed25519 AAAAevil"),
     "not one OpenSSH ed25519 public key"),
    (lambda record: record.update(host_public="ssh-rsa AAAAB3NzaC1yc2E attacker"), "not one OpenSSH ed25519"),
])
def test_a_warm_record_chooses_nothing_that_reaches_qemu_or_ssh(tmp_path, change, fragment):
    """A set from a cache or registry: the accelerator (and so -cpu) comes from the inputs the set is named
    by, and the host key is one line of the one type cloudbake makes; a record that says otherwise is refused
    before QEMU or known_hosts sees it."""
    import json

    from cloudbake.run.warm import verify_set

    base, warm = _kept_set(tmp_path)
    record = json.loads((warm.folder / "warm.json").read_text())
    change(record)
    (warm.folder / "warm.json").chmod(0o644)
    (warm.folder / "warm.json").write_text(json.dumps(record))
    with pytest.raises(PipelineError, match=fragment):
        verify_set(warm, base)


def test_a_failed_save_is_remembered_and_not_tried_again_for_a_day(tmp_path, make_pipeline, caplog, monkeypatch):
    """The next run boots cold at once instead of a second boot that would fail the same way."""
    import logging

    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.image.store import read_manifest
    from cloudbake.qemu.host import qemu_binary, qemu_version
    from cloudbake.run.warm import failed_save, remember_failed_save
    from cloudbake.run.warmstart import choose_warm_set, resolve_warm_key
    from tests.fixture.published import make_published

    caplog.set_level(logging.INFO, logger="cloudbake")
    pipeline = load_pipeline(make_pipeline("name: img\nvm: {accel: tcg}\n"))
    paths = resolve_paths(pipeline)
    image = make_published(pipeline.file.parent, name="img")
    manifest = read_manifest(image)
    key = resolve_warm_key(pipeline, paths, manifest, "tcg", qemu_version(qemu_binary(pipeline.source.arch)))
    remember_failed_save(image, key, "saving the VM's state failed (migration failed)")
    assert choose_warm_set(pipeline, paths, image, manifest, lambda version: pytest.fail("tried to save again")) is None
    assert "saving one failed within the last day (saving the VM's state failed" in caplog.text
    assert failed_save(image, key) is not None


def test_a_save_that_failed_for_a_missing_program_is_retried_once_it_is_installed(tmp_path, make_pipeline,
                                                                                 monkeypatch):
    """zstd missing: the run boots cold and later runs do not boot twice for nothing; once zstd is on PATH the
    next run saves. A marker written on another machine (it came in a restored cache) counts for nothing."""
    import json
    import shutil

    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.core.tools import ToolMissingError
    from cloudbake.image.store import read_manifest
    from cloudbake.qemu.host import qemu_binary, qemu_version
    from cloudbake.run.warm import failed_save, failed_save_marker
    from cloudbake.run.warmstart import choose_warm_set, resolve_warm_key
    from tests.fixture.published import make_published

    pipeline = load_pipeline(make_pipeline("name: img\nvm: {accel: tcg}\n"))
    paths = resolve_paths(pipeline)
    image = make_published(pipeline.file.parent, name="img")
    manifest = read_manifest(image)
    key = resolve_warm_key(pipeline, paths, manifest, "tcg", qemu_version(qemu_binary(pipeline.source.arch)))
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("qemu-system-x86_64", "qemu-img", "ps"):
        (tools / name).symlink_to(shutil.which(name))
    monkeypatch.setenv("PATH", str(tools))
    saves: list[str] = []

    def save(version: str):
        saves.append(version)
        raise ToolMissingError("zstd")

    assert choose_warm_set(pipeline, paths, image, manifest, save) is None
    assert choose_warm_set(pipeline, paths, image, manifest, save) is None
    assert len(saves) == 1 and failed_save(image, key) == "'zstd' not found on PATH"
    (tools / "zstd").symlink_to(shutil.which("zstd", path=os.defpath + ":/usr/bin"))
    assert failed_save(image, key) is None
    assert choose_warm_set(pipeline, paths, image, manifest, save) is None
    assert len(saves) == 2   # tried again: the reason no longer holds
    marker = failed_save_marker(image, key)
    record = json.loads(marker.read_text())
    (tools / "zstd").unlink()
    assert failed_save(image, key) is not None
    marker.write_text(json.dumps({**record, "host": "another-runner 6.1 x86_64"}))
    assert failed_save(image, key) is None


def test_a_warm_save_on_a_full_disk_boots_cold_with_a_warning(make_pipeline, monkeypatch, caplog):
    """The state filling the disk (OSError) is the expected save failure, not a traceback; the marker is
    written best-effort on that same full disk."""
    import errno
    import logging

    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.image.store import read_manifest
    from cloudbake.run import warm
    from cloudbake.run.warmstart import choose_warm_set
    from tests.fixture.published import make_published

    caplog.set_level(logging.INFO, logger="cloudbake")
    pipeline = load_pipeline(make_pipeline("name: img\nvm: {accel: tcg}\n"))
    image = make_published(pipeline.file.parent, name="img")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(warm, "write_atomically", full_disk)
    assert choose_warm_set(pipeline, resolve_paths(pipeline), image, read_manifest(image), full_disk) is None
    assert "could not save a warm state of img" in caplog.text and "No space left on device" in caplog.text
    assert "could not remember the failed save (No space left on device)" in caplog.text


def test_the_key_port_is_on_the_command_line_of_savers_and_restores_only(tmp_path):
    plain = build_qemu_argv(_spec(tmp_path), "qemu-system-x86_64")
    keyed = build_qemu_argv(_spec(tmp_path, key_channel=tmp_path / "key.sock"), "qemu-system-x86_64")
    assert "virtserialport,bus=cbserial.0,chardev=cbkey,name=dev.cloudbake.key" in keyed
    assert f"socket,id=cbkey,path={tmp_path / 'key.sock'},server=on,wait=off" in keyed
    assert not any("virtserialport" in arg for arg in plain)


def test_the_key_hand_over_sends_time_key_and_randomness_then_waits_for_ok(tmp_path):
    import socket
    import threading

    from cloudbake.core.errors import PipelineError
    from cloudbake.run.warm import hand_over_key

    path = tmp_path / "key.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def guest() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while data.count(b"\n") < 3:
                data += conn.recv(4096)
            got.append(data)
            conn.sendall(b"ok\n")

    thread = threading.Thread(target=guest)
    thread.start()
    before = time.time()
    hand_over_key(path, "ssh-ed25519 AAAA run-key", timeout_s=10)
    thread.join()
    now, key, seed = got[0].decode().splitlines()
    assert before <= float(now) <= time.time() and key == "ssh-ed25519 AAAA run-key" and len(seed) == 512
    server.close()
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(8)
    with silent, pytest.raises(PipelineError, match="did not take this run's key"):
        hand_over_key(tmp_path / "silent.sock", "k", timeout_s=1.5)


@pytest.mark.parametrize("guest", ["trickle", "flood"])
def test_a_guest_that_never_ends_its_answer_cannot_hold_the_hand_over(tmp_path, guest):
    """A resumed VM that sends a byte every 0.3 s without a newline, or floods bytes, is given up on at the
    hand-over's one deadline (its set is then not resumed), and the answer never grows past a small cap."""
    import socket
    import threading
    import time

    from cloudbake.core.errors import PipelineError
    from cloudbake.run.warm import hand_over_key

    path = tmp_path / "key.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.5)
                try:
                    conn.recv(4096)
                    while not stop.is_set():
                        conn.sendall(b"o" if guest == "trickle" else b"x" * 65536)
                        if guest == "trickle":
                            time.sleep(0.3)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(PipelineError, match="did not take this run's key"):
            hand_over_key(path, "ssh-ed25519 AAAA test", timeout_s=2.0)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert time.monotonic() - started < 5


def test_the_sweep_keeps_a_held_build_lock_and_a_valid_failed_save_marker(tmp_path, make_pipeline):
    """Hours-old entries of the warm folder: a build lock a live builder holds stays (its mtime is when it was
    made), and so does a failed-save marker still within its day; an unheld lock and an expired marker go."""
    import fcntl
    import json

    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.run.warm import failed_save_marker, remember_failed_save, sweep_orphans, warm_root
    from tests.fixture.published import make_published

    pipeline = load_pipeline(make_pipeline("name: img\nvm: {accel: tcg}\n"))
    image = make_published(pipeline.file.parent, name="img")
    root = warm_root(image)
    root.mkdir(parents=True)
    held, unheld = root / f".{image.stem}-aaaa.lock", root / f".{image.stem}-bbbb.lock"
    remember_failed_save(image, "cccc", "migration failed")
    remember_failed_save(image, "dddd", "migration failed")
    expired = failed_save_marker(image, "dddd")
    record = json.loads(expired.read_text())
    expired.write_text(json.dumps({**record, "time": record["time"] - 2 * 86400}))
    hours_ago = time.time() - 3 * 3600
    with open(held, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        unheld.write_text("")
        for entry in (held, unheld, failed_save_marker(image, "cccc"), expired):
            os.utime(entry, (hours_ago, hours_ago))
        sweep_orphans(image)
        assert held.exists() and not unheld.exists()
        assert failed_save_marker(image, "cccc").exists() and not expired.exists()
