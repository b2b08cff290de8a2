"""Warm start with real guests: resumed VMs are pristine, on time and take only their own key; a port
clash never costs the shared set; a corrupt state falls back to a cold boot (last: it breaks the set)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from cloudbake.run.warm import find_warm_set
from tests.fixture.e2e import BAKED_KEY

pytestmark = pytest.mark.e2e


def _assert_served(port: int, body: bytes) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
                assert answer.read() == body
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _clock_offset(vm) -> float:
    before = time.time()
    guest = float(vm.run("date +%s.%N", check=True).stdout)
    after = time.time()
    return 0.0 if before <= guest <= after else min(abs(guest - before), abs(guest - after))


def test_warm_runs_are_pristine_on_time_and_take_only_their_own_key(baked, monkeypatch):
    import cloudbake
    from cloudbake.config.model import Forward
    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.image.store import verify_published
    from cloudbake.qemu.host import qemu_binary, qemu_version
    from cloudbake.run.warmstart import resolve_warm_key

    loaded = load_pipeline(baked["pipeline"])
    pipeline = dataclasses.replace(loaded, test=dataclasses.replace(loaded.test, forward=(Forward(0, 8080),)))
    with cloudbake.vm(pipeline, upload=False) as first:
        assert first.vm is not None and first.files is not None
        assert first.vm.spec.incoming is not None, "the first VM did not start warm"
        assert _clock_offset(first) < 2.0
        # A forward the saved VM never had works in the resumed one, on 127.0.0.1 only.
        first.run("mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && sudo -n systemd-run -q "
                  "--unit=www --working-directory=/tmp/www python3 -m http.server 8080", check=True)
        assert first.run("echo $CLOUDBAKE_PORT_8080").stdout.strip() == str(first.port(8080))
        _assert_served(first.port(8080), b"forwarded\n")
        first.run("sudo -n sh -c 'echo scribbled > /etc/scribble'", check=True)
        accepted = first.run("cat ~/.ssh/authorized_keys", check=True).stdout.splitlines()
        warm = first.warm_set
        assert warm is not None and warm.meta.is_file()
        run_key = first.files.client_key.with_name("id_ed25519.pub").read_text().strip()
        assert run_key in accepted and BAKED_KEY in accepted  # the image's own keys stay
        record = json.loads(warm.meta.read_text())
        assert record["saved_with"] not in accepted, "the key the state was saved with is gone"
        # The set holds no secret: no private key, and a blank where the run's seed (with the saved
        # VM's private host key) was.
        assert not [p for p in warm.folder.iterdir() if p.name.startswith("id_")]
        assert warm.seed.read_bytes().count(0) == warm.seed.stat().st_size
        assert record["state_bytes"] <= record["memory_bytes"] // 2
    # The second resume finds its SSH port taken (another program got it after it was chosen):
    # it resumes on another port, and the shared set stays.
    import socket

    from cloudbake.run import warmstart as machine_module
    from cloudbake.run.runs import free_port

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    ports = iter([squatter.getsockname()[1]])
    real_free_port = free_port
    monkeypatch.setattr(machine_module, "free_port", lambda: next(ports, None) or real_free_port())
    with squatter, cloudbake.vm(pipeline, upload=False) as second:
        assert second.vm is not None and second.vm.spec.incoming is not None
        assert second.ssh_port != squatter.getsockname()[1]
        assert second.run("test -e /etc/scribble").status == 1, "the first warm run's write leaked"
        assert _clock_offset(second) < 2.0
    assert warm.meta.is_file(), "a port clash never costs the shared set"
    bigger = dataclasses.replace(pipeline, vm=dataclasses.replace(pipeline.vm, memory_bytes=1536 << 20))
    manifest = verify_published(baked["image"])
    accel = json.loads(warm.meta.read_text())["accel"]
    version = qemu_version(qemu_binary(pipeline.source.arch))
    paths = resolve_paths(pipeline)
    assert warm.folder.name.endswith(resolve_warm_key(pipeline, paths, manifest, accel, version))
    assert find_warm_set(baked["image"], resolve_warm_key(bigger, paths, manifest, accel, version)) is None


def test_a_corrupt_state_falls_back_to_a_cold_boot_with_a_warning(baked, caplog):
    """Last of the warm tests: it breaks the shared warm set (the next warm run rebuilds it)."""
    import cloudbake
    from cloudbake.config.pipeline import load_pipeline

    pipeline = load_pipeline(baked["pipeline"])
    sets = [p for p in (baked["image"].parent / ".warm").iterdir() if (p / "warm.json").is_file()]
    assert sets, "no warm set to corrupt: the warm tests before this one should have made one"
    for folder in sets:
        state = folder / "state.zst"
        state.chmod(0o644)
        data = bytearray(state.read_bytes())
        data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096
        state.write_bytes(bytes(data))
    with cloudbake.vm(pipeline, upload=False) as vm:
        assert vm.vm is not None and vm.vm.spec.incoming is None, "a corrupt state was used"
        assert vm.run("cat /etc/cloudbake-e2e", check=True).stdout == "baked\n"
    assert caplog.text.count("the warm start of") == 1 and "this run boots cold" in caplog.text
    tried = [folder for folder in sets if f"the warm start of {folder.name} failed" in caplog.text]
    assert len(tried) == 1 and not tried[0].exists(), "the set that failed is removed (the next run saves anew)"
