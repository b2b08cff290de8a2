"""A registry is data from outside: what a hostile, broken or slow one can and cannot do.

The hostile registry (tests/fixture/hostile_registry.py) serves whatever artifact a test
hands it; images are real qcow2 files made by qemu-img; the TLS cases use a throwaway CA.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cloudbake.config.model import RemoteCache
from cloudbake.core.errors import PipelineError
from cloudbake.image.store import is_published, published_image, pull_staging, sweep_pull_staging
from cloudbake.remote.client import Registry
from cloudbake.remote.credentials import Credentials
from cloudbake.remote.registry import pull_image, push_image, try_pull
from cloudbake.source.http import HttpSettings
from tests.conftest import PROJECT
from tests.fixture.hostile_registry import Behaviour, HostileRegistry, artifact_for
from tests.fixture.published import KEY, SMALL, make_published, store_at
from tests.fixture.registry import make_tls

FAST = replace(SMALL, http=HttpSettings(connect_timeout_s=3, read_timeout_s=5, attempts=2, backoff_s=0.01))


def remote(address: str, *, plain_http: bool = True, ca_file: Path | None = None) -> RemoteCache:
    return RemoteCache(registry=address, repository="cb/images", push=False, tag_latest=False,
                       plain_http=plain_http, ca_file=ca_file)


def qcow2(tmp_path: Path, *options: str, name: str = "evil.qcow2") -> bytes:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "16M"], check=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def no_docker_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("CLOUDBAKE_REGISTRY_USERNAME", "ci")
    monkeypatch.setenv("CLOUDBAKE_REGISTRY_PASSWORD", "hunter2-secret")


# --- what a pulled image may name ------------------------------------------------------------


@pytest.mark.parametrize(("options", "fragment"), [
    (("-u", "-b", "/etc/hostname", "-F", "raw"), "names a backing file ('/etc/hostname')"),
    (("-u", "-b", "nbd://127.0.0.1:1/x", "-F", "raw"), "names a backing file ('nbd://"),
    (("-u", "-b", 'json:{"file":{"driver":"file","filename":"/etc/shadow"}}', "-F", "raw"), "names a backing file"),
    (("-o", "data_file=DATA"), "keeps its data in an external file"),
])
def test_a_pulled_image_that_names_host_files_is_never_installed(tmp_path, options, fragment):
    options = tuple(o.replace("DATA", str(tmp_path / "host-data.raw")) for o in options)
    image = qcow2(tmp_path, *options)
    body, blobs = artifact_for(image, name="img", key=KEY)
    paths = store_at(tmp_path / "clone")
    with HostileRegistry(Behaviour(manifests={KEY: body}, blobs=blobs)) as server, \
            pytest.raises(PipelineError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        pull_image(remote(server.address), paths, "img", KEY, FAST)
    dest = published_image(paths, "img", KEY)
    assert not dest.exists() and not pull_staging(dest).exists()


def test_a_self_contained_image_from_the_hostile_server_is_installed(tmp_path):
    image = qcow2(tmp_path)
    body, blobs = artifact_for(image, name="img", key=KEY)
    with HostileRegistry(Behaviour(manifests={KEY: body}, blobs=blobs)) as server:
        pulled = pull_image(remote(server.address), store_at(tmp_path / "clone"), "img", KEY, FAST)
    assert pulled is not None and pulled.read_bytes() == image


def test_layers_adding_up_to_terabytes_are_refused_before_any_layer(tmp_path):
    huge = [("sha256:" + f"{i:064x}", 1 << 40) for i in range(3)]
    body, blobs = artifact_for(b"", name="img", key=KEY, layers=huge)
    behaviour = Behaviour(manifests={KEY: body}, blobs=blobs)
    with HostileRegistry(behaviour) as server, pytest.raises(PipelineError, match="add up to 3.0 TiB"):
        pull_image(remote(server.address), store_at(tmp_path), "img", KEY, FAST)
    assert [p for m, p, _ in behaviour.requests if "/blobs/" in p and p.endswith(tuple(d for d, _ in huge))] == []


# --- credentials stay with the registry's origin ---------------------------------------------


def test_an_upload_location_downgrading_to_http_is_refused_and_gets_nothing(tmp_path, tls, no_docker_config):
    published = make_published(tmp_path / "baker")
    with HostileRegistry() as elsewhere, \
            HostileRegistry(Behaviour(upload_location=f"http://localhost:{elsewhere.address.split(':')[1]}/up"),
                            tls=(tls.cert, tls.key)) as server, \
            pytest.raises(PipelineError, match="plain HTTP; refused"):
        push_image(remote(server.address, plain_http=False, ca_file=tls.ca), published, FAST)
    assert elsewhere.behaviour.requests == []


def test_a_location_on_another_origin_gets_no_credentials(tmp_path, tls, no_docker_config):
    published = make_published(tmp_path / "baker")
    with HostileRegistry(tls=(tls.cert, tls.key)) as elsewhere, \
            HostileRegistry(Behaviour(challenge='Basic realm="r"'), tls=(tls.cert, tls.key)) as server:
        server.behaviour.upload_location = f"{elsewhere.url}/up"
        push_image(remote(server.address, plain_http=False, ca_file=tls.ca), published, FAST)
    assert any(auth for _, _, auth in server.behaviour.requests), "the registry itself got the credentials"
    assert elsewhere.behaviour.requests and all(auth is None for _, _, auth in elsewhere.behaviour.requests)


def test_a_401_from_a_blob_redirect_on_another_origin_is_never_answered(tmp_path, no_docker_config):
    image = qcow2(tmp_path)
    body, blobs = artifact_for(image, name="img", key=KEY)
    storage = Behaviour(challenge='Basic realm="storage"')
    with HostileRegistry(storage) as other, \
            HostileRegistry(Behaviour(manifests={KEY: body}, blobs=blobs, blob_redirect=other.url)) as server, \
            pytest.raises(PipelineError, match="asked for credentials.*not answered"):
        pull_image(remote(server.address), store_at(tmp_path / "clone"), "img", KEY, FAST)
    assert storage.requests and all(auth is None for _, _, auth in storage.requests)


def test_credentials_are_checked_on_every_request_not_only_after_a_401():
    registry = Registry(remote("registry.example:5000"), FAST, Credentials("ci", "hunter2", "test"))
    with pytest.raises(PipelineError, match="refusing to send registry credentials over plain HTTP"):
        registry.manifest(KEY)


def test_plain_http_on_loopback_without_the_option_names_it(tmp_path):
    with HostileRegistry() as server, pytest.raises(PipelineError) as caught:
        pull_image(remote(server.address, plain_http=False), store_at(tmp_path), "img", KEY, FAST)
    assert "speaks plain HTTP" in caught.value.message and "cache.plain_http" in str(caught.value.hint)
    assert "not trusted" not in str(caught.value)


# --- slow, stopped and failed pulls -------------------------------------------------------------


def test_a_trickling_manifest_is_cut_off_and_the_bake_goes_on(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cloudbake")
    body, blobs = artifact_for(qcow2(tmp_path), name="img", key=KEY)
    slow = replace(FAST, http=replace(FAST.http, min_rate_bytes_s=1 << 20, rate_window_s=0.5, read_timeout_s=30))
    with HostileRegistry(Behaviour(manifests={KEY: body}, blobs=blobs, trickle_s=0.05)) as server:
        started = time.monotonic()
        assert try_pull(remote(server.address), store_at(tmp_path / "clone"), "img", KEY, slow) is None
    assert time.monotonic() - started < 25   # without the floor: len(body) x 0.05 s per attempt, read timeout never
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slower than" in warnings[0].getMessage() and "baking instead" in \
        warnings[0].getMessage()


def test_a_trickling_error_body_is_cut_off_too(tmp_path, caplog):
    """A manifest answered 500 with a 64 KiB error body sent a byte at a time: error bodies are read like every
    other body (capped, under the rate floor), so the pull gives up and the bake goes on."""
    caplog.set_level(logging.WARNING, logger="cloudbake")
    slow = replace(FAST, http=replace(FAST.http, min_rate_bytes_s=1 << 20, rate_window_s=0.5, read_timeout_s=30,
                                      attempts=1))
    with HostileRegistry(Behaviour(manifest_error=500, trickle_s=0.05)) as server:
        started = time.monotonic()
        assert try_pull(remote(server.address), store_at(tmp_path / "clone"), "img", KEY, slow) is None
    assert time.monotonic() - started < 25   # before: 65,536 bytes x 0.05 s, the read timeout never tripping
    assert any("answered 500" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


PULL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cloudbake.core.errors import stop_signals_unwind, Interrupted
    from cloudbake.source.http import HttpSettings
    from cloudbake.config.paths import Paths
    from cloudbake.config.model import RemoteCache
    from cloudbake.remote.client import RegistrySettings
    from cloudbake.remote.registry import pull_image
    folder = Path(sys.argv[2])
    paths = Paths(work_dir=folder / "w", output_dir=folder / "dist", cache_dir=folder / "c",
                  lock_file=folder / "l", state_dir=folder)
    remote = RemoteCache(registry=sys.argv[1], repository="cb/images", push=False, tag_latest=False,
                         plain_http=True, ca_file=None)
    settings = RegistrySettings(layer_bytes=1 << 20, pull_parallel=3,
                                http=HttpSettings(read_timeout_s=600, min_rate_bytes_s=0, attempts=1))
    try:
        with stop_signals_unwind():
            print("pulling", flush=True)
            pull_image(remote, paths, "img", sys.argv[3], settings)
    except Interrupted as stop:
        print("interrupted", stop.signal_name, flush=True)
        sys.exit(130)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_a_pull_unwinds_without_waiting_for_the_layers(tmp_path, signum):
    body, blobs = artifact_for(os.urandom(3 << 20), name="img", key=KEY)
    # Manifest and config arrive quickly; each layer of 1 MiB would take days at this pace.
    behaviour = Behaviour(manifests={KEY: body}, blobs=blobs)
    with HostileRegistry(behaviour) as server:
        original = server.reply

        def slow_layers(h, status, data, headers=None):
            behaviour.trickle_s = 0.5 if len(data) > (64 << 10) else 0.0
            original(h, status, data, headers)
        server.reply = slow_layers  # type: ignore[method-assign]
        proc = subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, server.address, str(tmp_path), KEY],
                                cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(behaviour.seen("GET", "/blobs/")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signum)
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
    assert f"interrupted {signal.Signals(signum).name}" in out, out + err
    assert time.monotonic() - started < 15, "the layers in flight would have taken days"
    assert "Traceback" not in err


def test_a_failed_pull_leaves_no_staging_once_the_image_is_baked(tmp_path):
    paths = store_at(tmp_path / "clone")
    dest = published_image(paths, "img", KEY)
    staging = pull_staging(dest)
    staging.mkdir(parents=True)
    (staging / "image").write_bytes(b"half a pull")
    # The bake that followed publishes the image: the staging folder goes with it.
    baked = make_published(tmp_path / "clone")
    assert baked == dest and is_published(dest) and not staging.exists()


def test_old_staging_folders_are_swept(tmp_path):
    output = tmp_path / "dist"
    old, fresh = output / ".gone-abc.qcow2.pull", output / ".other-def.qcow2.pull"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "image").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old / "image", (two_days_ago, two_days_ago))
    assert sweep_pull_staging(output) == [old]
    assert fresh.exists()


def test_stop_flag_ends_parts_between_chunks():
    import threading

    from cloudbake.source.http import TransferStoppedError, run_parallel

    stop = threading.Event()
    done: list[int] = []

    def part(item: int) -> None:
        for _ in range(1000):
            if stop.is_set():
                raise TransferStoppedError()
            time.sleep(0.01)
        done.append(item)

    def boom(item: int) -> None:
        if item == 0:
            raise PipelineError("part 0 failed")
        part(item)

    with pytest.raises(PipelineError, match="part 0 failed"):
        run_parallel(boom, [0, 1, 2], 3, stop)
    assert done == [] and stop.is_set()
