"""The OCI registry cache (cloudbake/remote/registry.py) against a real registry: Debian's docker-registry on 127.0.0.1."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from cloudbake.config.model import RemoteCache, parse_remote
from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.image.store import manifest_path, published_image, verify_published
from cloudbake.remote.artifact import ARTIFACT_TYPE, CONFIG_TYPE, LAYER_TYPE, parse_artifact
from cloudbake.remote.auth import RegistryAuth, parse_challenge
from cloudbake.remote.client import Registry
from cloudbake.remote.credentials import Credentials, resolve_credentials
from cloudbake.remote.registry import pull_image, push_image, try_pull
from cloudbake.source.http import HttpSettings
from tests.fixture.published import KEY, SMALL, image_sha, make_published, remote_for, store_at, with_remote
from tests.fixture.registry import TOKEN, FaultProxy, Faults, make_htpasswd, make_tls
from tests.fixture.registry import Registry as RegistryServer


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_published(tmp_path_factory.mktemp("baker"))


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize("header, scheme, params", [
    ('Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull,push"', "bearer",
     {"realm": "https://ghcr.io/token", "service": "ghcr.io", "scope": "repository:a/b:pull,push"}),
    ('Basic realm="registry"', "basic", {"realm": "registry"}),
    ("", "", {}),
])
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert parse_challenge(header) == (scheme, params)


@pytest.mark.parametrize("url, registry, repository", [
    ("oci://ghcr.io/acme/images", "ghcr.io", "acme/images"),
    ("oci://Registry.Example.com:5000/team/cloudbake/base", "registry.example.com:5000", "team/cloudbake/base"),
])
def test_parse_remote(url: str, registry: str, repository: str) -> None:
    assert parse_remote(url) == (registry, repository)


@pytest.mark.parametrize("remote, fragment", [
    ("https://ghcr.io/acme/images", "cache.remote"),
    ("oci://ghcr.io", "cache.remote"),
    ("oci://ghcr.io/Acme/Images", "cache.remote"),
    ("oci://ghcr.io/acme/../images", "cache.remote"),
])
def test_bad_remote_is_a_pipeline_error_with_its_line(make_pipeline, remote: str, fragment: str) -> None:
    path = make_pipeline(f"name: x\ncache:\n  remote: {remote}\n")
    with pytest.raises(PipelineError) as err:
        load_pipeline(path)
    assert fragment in str(err.value) and ":3" in str(err.value)


def test_remote_settings_reach_the_pipeline(make_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_pipeline("name: x\ncache:\n  remote: oci://127.0.0.1:5000/cb/images\n  plain_http: true\n"
                         "  ca_file: ca.pem\n")
    monkeypatch.delenv("CLOUDBAKE_PUSH", raising=False)
    remote = load_pipeline(path).remote
    assert remote is not None and (remote.registry, remote.repository, remote.push) == ("127.0.0.1:5000",
                                                                                         "cb/images", False)
    assert remote.ca_file == path.parent / "ca.pem" and remote.plain_http
    monkeypatch.setenv("CLOUDBAKE_PUSH", "1")
    remote = load_pipeline(path).remote
    assert remote is not None and remote.push


def artifact(**changes: object) -> bytes:
    layer = {"mediaType": LAYER_TYPE, "digest": "sha256:" + "a" * 64, "size": 10}
    doc = {"schemaVersion": 2, "artifactType": ARTIFACT_TYPE, "layers": [layer],
           "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + "b" * 64, "size": 5}}
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("body, fragment", [
    (b"\x00not json", "not JSON"),
    (b"[]", "not a JSON object"),
    (artifact(artifactType="application/vnd.oci.image.config.v1+json"), "artifactType"),
    (artifact(config={"mediaType": "application/json", "digest": "sha256:" + "b" * 64, "size": 5}), "config"),
    (artifact(layers=[]), "no layers"),
    (artifact(layers=[{"mediaType": LAYER_TYPE, "digest": "sha256:../../etc", "size": 1}]), "digest"),
    (artifact(layers=[{"mediaType": LAYER_TYPE, "digest": "sha256:" + "a" * 64, "size": -1}]), "size"),
    (artifact(layers=[{"mediaType": LAYER_TYPE, "digest": "sha256:" + "a" * 64, "size": True}]), "size"),
    (artifact(layers=[{"mediaType": "text/plain", "digest": "sha256:" + "a" * 64, "size": 1}]), "descriptor"),
])
def test_hostile_manifests_are_refused(body: bytes, fragment: str) -> None:
    with pytest.raises(PipelineError) as err:
        parse_artifact(body, "oci://r/x:k")
    assert fragment in err.value.message and "refused" in err.value.message


def test_credentials_from_the_environment() -> None:
    creds = resolve_credentials("r.example", {"CLOUDBAKE_REGISTRY_USERNAME": "u", "CLOUDBAKE_REGISTRY_PASSWORD": "p",
                                              "HOME": "/nonexistent"})
    assert creds is not None and (creds.username, creds.secret) == ("u", "p") and "p" not in repr(creds)
    ghcr = resolve_credentials("ghcr.io", {"GITHUB_TOKEN": "ghs_x", "GITHUB_ACTOR": "octo", "HOME": "/nonexistent"})
    assert ghcr is not None and (ghcr.username, ghcr.secret, ghcr.source) == ("octo", "ghs_x", "GITHUB_TOKEN")
    assert resolve_credentials("r.example", {"GITHUB_TOKEN": "ghs_x", "HOME": "/nonexistent"}) is None


def write_helper(folder: Path, name: str, script: str) -> Path:
    """A stand-in docker-credential-<name> program (Docker's helper protocol: host on stdin, JSON out)."""
    folder.mkdir(parents=True, exist_ok=True)
    helper = folder / f"docker-credential-{name}"
    helper.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    return helper


def test_credentials_from_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    write_helper(bin_dir, "vault", """\
        read host
        [ "$1" = get ] || exit 3
        [ "$host" = helped.example ] && echo '{"ServerURL":"helped.example","Username":"hu","Secret":"hs"}' && exit 0
        echo "credentials not found in native keychain"; exit 1
        """)
    write_helper(bin_dir, "broken", "echo 'secret-in-output s3cr3t' >&2; exit 4\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    env = {"DOCKER_CONFIG": str(config.parent)}

    def creds(registry: str, doc: object) -> Credentials | None:
        config.write_text(json.dumps(doc))
        return resolve_credentials(registry, env)

    basic = {"auths": {"https://plain.example/v1/": {"auth": base64.b64encode(b"pu:pp").decode()}}}
    found = creds("plain.example", basic)
    assert found is not None and (found.username, found.secret) == ("pu", "pp")
    assert creds("other.example", basic) is None
    helped = creds("helped.example", {"credHelpers": {"helped.example": "vault"}})
    assert helped is not None and (helped.username, helped.secret) == ("hu", "hs")
    assert creds("nothere.example", {"credsStore": "vault"}) is None       # "credentials not found"
    hub = creds("docker.io", {"auths": {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"d:h").decode()}}})
    assert hub is not None and hub.secret == "h"
    token = creds("t.example", {"auths": {"t.example": {"identitytoken": "refresh"}}})
    assert token is not None and token.is_identity_token
    with pytest.raises(PipelineError) as err:
        creds("x.example", {"credsStore": "broken"})
    assert "exit status 4" in err.value.message and "s3cr3t" not in str(err.value)
    with pytest.raises(PipelineError, match="not on PATH"):
        creds("x.example", {"credHelpers": {"x.example": "absent"}})
    with pytest.raises(PipelineError, match="base64"):
        creds("b.example", {"auths": {"b.example": {"auth": "!!!"}}})
    config.write_text("{not json")
    with pytest.raises(PipelineError, match="cannot read Docker's config"):
        resolve_credentials("b.example", env)


def test_credentials_never_travel_in_plain_http_to_another_host() -> None:
    auth = RegistryAuth(Credentials("u", "p", "test"), True, HttpSettings())
    with pytest.raises(PipelineError, match="plain HTTP"):
        auth._answer('Basic realm="r"', "http://registry.example:5000/v2/")
    assert auth._answer('Basic realm="r"', "http://127.0.0.1:5000/v2/") == "Basic " + base64.b64encode(b"u:p").decode()
    assert auth._answer('Basic realm="r"', "https://registry.example/v2/") is not None


# --- against the registry ------------------------------------------------------------------


def test_push_then_pull_into_another_store(registry, published: Path, tmp_path: Path) -> None:
    remote = remote_for(registry.address)
    digest = push_image(remote, published, SMALL)
    assert KEY in registry.tags("cb/images")
    paths = store_at(tmp_path / "clone")
    pulled = pull_image(remote, paths, "img", KEY, SMALL)
    assert pulled == published_image(paths, "img", KEY)
    assert image_sha(pulled) == image_sha(published)
    assert manifest_path(pulled).read_bytes() == manifest_path(published).read_bytes()
    assert verify_published(pulled).key == KEY
    assert (paths.output_dir / "img.qcow2").resolve() == pulled.resolve()
    assert not list(paths.output_dir.glob(".*.pull"))  # the parts are gone once joined
    # The manifest is an OCI 1.1 artifact with one layer per MiB, titled in order.
    body = Registry(remote, SMALL).manifest(KEY)
    assert body is not None and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    doc = json.loads(body)
    assert doc["artifactType"] == ARTIFACT_TYPE and len(doc["layers"]) == -(-published.stat().st_size // (1 << 20))
    assert doc["layers"][1]["annotations"]["org.opencontainers.image.title"] == f"{published.name}.part0001"
    assert doc["annotations"]["dev.cloudbake.key"] == KEY
    assert doc["annotations"]["dev.cloudbake.distro"] == "ubuntu"   # baked before there were others
    assert doc["annotations"]["dev.cloudbake.upstream.serial"] == "20261127"
    # Pulled again: nothing moves.
    assert pull_image(remote, paths, "img", KEY, SMALL) == pulled


def test_a_second_push_uploads_nothing(registry, published: Path) -> None:
    faults = Faults()
    with FaultProxy(registry.address, faults) as proxy:
        push_image(remote_for(registry.address), published, SMALL)
        push_image(remote_for(proxy.address), published, SMALL)
    assert faults.seen("HEAD") and not faults.seen("PATCH") and not faults.seen("POST")
    assert [path for _, path, _ in faults.seen("PUT")] == [f"/v2/cb/images/manifests/{KEY}"]


def test_oras_pulls_what_cloudbake_pushed(registry, published: Path, tmp_path: Path) -> None:
    """Interoperability with the ORAS Python SDK: its pull writes the titled parts, which join to the image."""
    import oras.client as oras_client  # type: ignore[import-untyped]
    push_image(remote_for(registry.address), published, SMALL)
    client = oras_client.OrasClient(hostname=registry.address, insecure=True)
    files = client.pull(target=f"{registry.address}/cb/images:{KEY}", outdir=str(tmp_path / "oras"))
    parts = sorted(Path(f) for f in files if Path(f).name.startswith(published.name))
    assert len(parts) > 1
    assert hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest() == image_sha(published)


def test_a_missing_key_is_a_miss_not_an_error(registry, tmp_path: Path) -> None:
    assert pull_image(remote_for(registry.address), store_at(tmp_path), "img", "f" * 16, SMALL) is None
    assert not (tmp_path / "dist" / f"img-{'f' * 16}.qcow2").exists()


def test_a_pull_cut_off_half_way_resumes(registry, published: Path, tmp_path: Path) -> None:
    push_image(remote_for(registry.address), published, SMALL)
    faults = Faults(cut_blob_get_after=300 << 10)
    with FaultProxy(registry.address, faults) as proxy:
        pulled = pull_image(remote_for(proxy.address), store_at(tmp_path), "img", KEY, replace(SMALL, pull_parallel=1))
    assert pulled is not None and image_sha(pulled) == image_sha(published)
    ranged = [headers.get("Range") for _, _, headers in faults.seen("GET", "/blobs/") if headers.get("Range")]
    assert ranged == [f"bytes={300 << 10}-"]


def test_a_pull_killed_part_way_keeps_its_finished_layers(registry, published: Path, tmp_path: Path) -> None:
    push_image(remote_for(registry.address), published, SMALL)
    once = replace(SMALL, pull_parallel=1, http=replace(SMALL.http, attempts=1))
    paths = store_at(tmp_path)
    with FaultProxy(registry.address, Faults(cut_blob_get_after=100 << 10, cut_skip=2)) as proxy, \
            pytest.raises(PipelineError):
        pull_image(remote_for(proxy.address), paths, "img", KEY, once)
    assert not published_image(paths, "img", KEY).exists()
    kept = json.loads((paths.output_dir / f".{published.name}.pull" / "done.json").read_text())
    assert {0, 1} <= set(kept) and 2 not in kept    # the first two arrived whole; the third was cut
    faults = Faults()
    with FaultProxy(registry.address, faults) as proxy:
        pulled = pull_image(remote_for(proxy.address), paths, "img", KEY, once)
    assert pulled is not None and image_sha(pulled) == image_sha(published)
    layers = len(json.loads(Registry(remote_for(registry.address), SMALL).manifest(KEY) or b"")["layers"])
    assert len(faults.seen("GET", "/blobs/sha256:")) == 1 + layers - len(kept)   # the config, and the rest


def test_a_store_that_cannot_be_written_is_an_error_not_a_traceback(registry, published: Path,
                                                                     tmp_path: Path) -> None:
    push_image(remote_for(registry.address), published, SMALL)
    paths = store_at(tmp_path)
    paths.output_dir.mkdir(parents=True)
    (paths.output_dir / f".{published.name}.pull").write_text("in the way")
    with pytest.raises(PipelineError, match="cannot write the pulled image"):
        pull_image(remote_for(registry.address), paths, "img", KEY, SMALL)


def test_a_corrupt_blob_never_reaches_the_store(tmp_path: Path) -> None:
    image = make_published(tmp_path / "baker")
    with RegistryServer(tmp_path / "registry") as server:
        remote = remote_for(server.address)
        push_image(remote, image, SMALL)
        layer = json.loads(Registry(remote, SMALL).manifest(KEY) or b"")["layers"][2]["digest"]
        blob = server.blob_file(layer)
        data = bytearray(blob.read_bytes())
        data[1000] ^= 0xFF
        blob.write_bytes(bytes(data))
        paths = store_at(tmp_path / "clone")
        with pytest.raises(PipelineError, match="SHA-256 mismatch"):
            pull_image(remote, paths, "img", KEY, SMALL)
        assert not published_image(paths, "img", KEY).exists()
        assert not manifest_path(published_image(paths, "img", KEY)).exists()


def test_a_registry_killed_mid_push_leaves_no_tag_and_a_retry_succeeds(tmp_path: Path) -> None:
    image = make_published(tmp_path / "baker")
    server = RegistryServer(tmp_path / "registry").start()
    try:
        faults = Faults(on_patch_bytes=(2 << 20, server.kill))
        with FaultProxy(server.address, faults) as proxy, pytest.raises(PipelineError, match="gave up after"):
            push_image(remote_for(proxy.address), image, SMALL)
        server.start()
        assert server.tags("cb/images") == []
        push_image(remote_for(server.address), image, SMALL)
        assert server.tags("cb/images") == [KEY]
        pulled = pull_image(remote_for(server.address), store_at(tmp_path / "clone"), "img", KEY, SMALL)
        assert pulled is not None and image_sha(pulled) == image_sha(image)
    finally:
        server.stop()


@pytest.mark.parametrize("after", [1, 1 << 20], ids=["first-patch", "a-later-patch"])
def test_a_chunked_upload_resumes_where_the_registry_stopped(registry, tmp_path: Path, after: int) -> None:
    """A dropped PATCH: the next attempt asks the registry how far it got and goes on from there (a drop
    of an upload's first PATCH leaves distribution saying `Range: 0-0`, which is nothing, not one byte)."""
    image = make_published(tmp_path / "baker", key=f"{after:016x}")

    def drop() -> None:
        raise ConnectionResetError("dropped by the test")

    faults = Faults(on_patch_bytes=(after, drop))
    with FaultProxy(registry.address, faults) as proxy:
        push_image(remote_for(proxy.address), image, SMALL)
    assert faults.seen("GET", "/blobs/uploads/")   # the upload's status was asked for
    pulled = pull_image(remote_for(registry.address), store_at(tmp_path / "clone"), "img", f"{after:016x}", SMALL)
    assert pulled is not None and image_sha(pulled) == image_sha(image)


def test_four_clones_pull_the_same_key_at_once(registry, published: Path, tmp_path: Path) -> None:
    remote = remote_for(registry.address)
    push_image(remote, published, SMALL)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pulled = list(pool.map(lambda n: pull_image(remote, store_at(tmp_path / f"clone{n}"), "img", KEY, SMALL),
                               range(4)))
    assert {image_sha(p) for p in pulled if p is not None} == {image_sha(published)} and None not in pulled


def test_two_machines_pushing_the_same_key_leave_one_complete_artifact(registry, tmp_path: Path) -> None:
    key = "2" * 16
    images = [make_published(tmp_path / f"baker{n}", seed=bytes([n]), key=key) for n in range(2)]
    remote = remote_for(registry.address)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda image: push_image(remote, image, SMALL), images))
    pulled = pull_image(remote, store_at(tmp_path / "clone"), "img", key, SMALL)
    assert pulled is not None and image_sha(pulled) in {image_sha(i) for i in images}


def test_a_read_only_credential_is_told_apart_and_5xx_is_retried(registry, published: Path, tmp_path: Path) -> None:
    push_image(remote_for(registry.address), published, SMALL)
    other = make_published(tmp_path / "other", key="3" * 16)
    with FaultProxy(registry.address, Faults(deny_writes=True)) as proxy, pytest.raises(PipelineError) as err:
        push_image(remote_for(proxy.address), other, SMALL)
    assert "denied" in err.value.message and "403" in err.value.message and "DENIED" in err.value.message
    assert "\x1b" not in str(err.value)            # the registry's words, without its control characters
    assert "may read but not write" in str(err.value.hint)
    faults = Faults(unavailable=2)
    with FaultProxy(registry.address, faults) as proxy:
        pulled = pull_image(remote_for(proxy.address), store_at(tmp_path / "clone"), "img", KEY, SMALL)
    assert pulled is not None and image_sha(pulled) == image_sha(published)


def test_a_registry_that_is_down_is_a_warning_before_a_bake(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.fixture.registry import free_port

    caplog.set_level(logging.WARNING, logger="cloudbake")
    dead = remote_for(f"127.0.0.1:{free_port()}")
    assert try_pull(dead, store_at(tmp_path), "img", KEY, replace(SMALL, http=replace(SMALL.http, attempts=1))) is None
    assert "cannot pull from" in caplog.text and "baking instead" in caplog.text


# --- auth and TLS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_registry(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("secure-registry")
    tls = make_tls(folder / "tls")
    htpasswd = make_htpasswd(folder / "htpasswd", "ci", "correct horse")
    with RegistryServer(folder / "registry", tls=tls, htpasswd=htpasswd) as server:
        yield server


def test_tls_and_basic_auth(secure_registry, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cloudbake")
    monkeypatch.setenv("HOME", str(tmp_path))   # no Docker config of the machine's
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    ca = secure_registry.tls.ca
    remote = remote_for(secure_registry.address, plain_http=False, ca_file=ca)
    with pytest.raises(PipelineError) as err:
        push_image(replace(remote, ca_file=None), published, SMALL)
    assert "TLS verification failed" in err.value.message and "cache.ca_file" in str(err.value.hint)
    with pytest.raises(PipelineError) as err:
        push_image(remote, published, SMALL)
    assert "401" in err.value.message and "CLOUDBAKE_REGISTRY_USERNAME" in str(err.value.hint)
    monkeypatch.setenv("CLOUDBAKE_REGISTRY_USERNAME", "ci")
    monkeypatch.setenv("CLOUDBAKE_REGISTRY_PASSWORD", "wr0ng-pw")
    with pytest.raises(PipelineError) as err:
        push_image(remote, published, SMALL)
    assert "401" in err.value.message and "CLOUDBAKE_REGISTRY_PASSWORD" in str(err.value.hint)
    monkeypatch.setenv("CLOUDBAKE_REGISTRY_PASSWORD", "correct horse")
    push_image(remote, published, SMALL)
    pulled = pull_image(remote, store_at(tmp_path / "clone"), "img", KEY, SMALL)
    assert pulled is not None and image_sha(pulled) == image_sha(published)
    assert "correct horse" not in caplog.text and "wr0ng-pw" not in caplog.text


def test_bearer_token_flow(registry, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    faults = Faults(bearer=("robot", "s3cret"))
    with FaultProxy(registry.address, faults) as proxy:
        remote = remote_for(proxy.address)
        monkeypatch.setenv("CLOUDBAKE_REGISTRY_USERNAME", "robot")
        monkeypatch.setenv("CLOUDBAKE_REGISTRY_PASSWORD", "nope")
        with pytest.raises(PipelineError) as err:
            push_image(remote, published, SMALL)
        assert "token service" in err.value.message and "refused" in err.value.message
        monkeypatch.setenv("CLOUDBAKE_REGISTRY_PASSWORD", "s3cret")
        push_image(remote, published, SMALL)
        pulled = pull_image(remote, store_at(tmp_path / "clone"), "img", KEY, SMALL)
    assert pulled is not None and image_sha(pulled) == image_sha(published)
    assert len(faults.seen("GET", "/token")) >= 1
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for m, p, h in faults.requests
               if p.startswith("/v2/cb/") and m in ("PATCH", "PUT") and "Authorization" in h)


def test_removed_copy_is_pulled_again(registry, published: Path, tmp_path: Path) -> None:
    """A store whose image was deleted (manifest kept) takes a fresh pull, never the stale manifest."""
    remote = remote_for(registry.address)
    push_image(remote, published, SMALL)
    paths = store_at(tmp_path / "clone")
    pulled = pull_image(remote, paths, "img", KEY, SMALL)
    assert pulled is not None
    pulled.unlink()
    again = pull_image(remote, paths, "img", KEY, SMALL)
    assert again is not None and image_sha(again) == image_sha(published)
    shutil.rmtree(paths.output_dir)


# --- through doit: push, pull, and the pull before a bake ---------------------------------------


def test_doit_push_then_a_fresh_project_bakes_by_pulling(registry, tmp_path: Path) -> None:
    from tests.fixture.e2e import doit
    from tests.fixture.offline import offline_project

    baker = offline_project(tmp_path / "baker", published=True)
    with_remote(baker, f"oci://{registry.address}/cb/doit")
    pushed = doit("push", f"pipeline={baker}", cwd=baker.parent, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed oci://" in pushed.stderr
    image = next(p for p in (baker.parent / "dist").glob("offline-*.qcow2") if not p.is_symlink())
    assert registry.tags("cb/doit") == [image.stem.removeprefix("offline-")]

    fresh = offline_project(tmp_path / "fresh")
    with_remote(fresh, f"oci://{registry.address}/cb/doit")
    baked = doit("bake", f"pipeline={fresh}", cwd=fresh.parent, timeout=120)
    assert baked.returncode == 0, baked.stderr
    assert "pulled" in baked.stderr and "starting qemu" not in baked.stderr
    assert image_sha(fresh.parent / "dist" / image.name) == image_sha(image)
    again = doit("pull", f"pipeline={fresh}", cwd=fresh.parent, timeout=120)
    assert again.returncode == 0 and "pulling" not in again.stderr


def test_doit_pull_of_a_missing_key_and_push_without_a_remote_say_what_to_do(registry, tmp_path: Path) -> None:
    from tests.fixture.e2e import doit
    from tests.fixture.offline import offline_project

    project = offline_project(tmp_path / "p", published=True)
    pushed = doit("push", f"pipeline={project}", cwd=project.parent, timeout=120)
    said = pushed.stdout + pushed.stderr
    assert pushed.returncode != 0 and "sets no cache.remote" in said and "Traceback" not in said
    with_remote(project, f"oci://{registry.address}/cb/empty")
    (project.parent / "cloud-init" / "user-data.yaml").write_text("#cloud-config\nruncmd: [[echo, changed]]\n")
    pulled = doit("pull", f"pipeline={project}", cwd=project.parent, timeout=120)
    said = pulled.stdout + pulled.stderr
    assert pulled.returncode != 0 and "is not in the registry" in said and "cloudbake push" in said
    assert "Traceback" not in said



# --- warm sets through the registry ----------------------------------------------------------------


def _project_with_image(folder: Path, remote: RemoteCache) -> tuple:
    """A pipeline in ``folder`` whose image is published there, plus a warm set for this host made
    of real files (no guest: the bytes stand for a saved state)."""
    from cloudbake.config.paths import resolve_paths
    from cloudbake.image.store import read_manifest
    from cloudbake.qemu.host import qemu_binary, qemu_version
    from cloudbake.run.warm import WarmSet, keep_as_warm_set, warm_key, warm_set_for
    from cloudbake.run.warmstart import warm_inputs_for_key

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cloud-init").mkdir(exist_ok=True)
    (folder / "cloud-init" / "user-data.yaml").write_text("#cloud-config\n")
    (folder / "pipeline.yaml").write_text(textwrap.dedent(f"""\
        name: img
        vm: {{accel: tcg}}
        cache: {{remote: "oci://{remote.registry}/{remote.repository}", plain_http: true}}
        """))
    pipeline = load_pipeline(folder / "pipeline.yaml")
    paths = resolve_paths(pipeline)
    image = make_published(folder, name="img", seed=b"warm")
    manifest = read_manifest(image)
    inputs = warm_inputs_for_key(pipeline, paths, manifest, "tcg", qemu_version(qemu_binary(pipeline.source.arch)))
    run = folder / "dist" / ".runs" / "r1"
    run.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f"../../{image.name}",
                    str(run / "disk.qcow2")], check=True)
    for name, size in (("state.zst", 3 << 20), ("efivars.fd", 64 << 10), ("seed.iso", 8 << 10)):
        (run / name).write_bytes(os.urandom(size))
    warm: WarmSet = warm_set_for(image, warm_key(inputs))
    keep_as_warm_set(warm, run / "disk.qcow2", run / "efivars.fd", run / "seed.iso", run / "state.zst",
                     {"inputs": inputs, "accel": "tcg", "host_public": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPseedtestkeyseedtestkeyseedtest test", "state_bytes": 3 << 20,
                      "memory_bytes": 1 << 30})
    return pipeline, paths, image, warm


def test_a_warm_set_travels_through_the_registry_and_an_altered_one_is_refused(registry, tmp_path, caplog):
    from cloudbake.config.paths import resolve_paths
    from cloudbake.remote.warmshare import pull_warm_set, push_warm_set, try_pull_warm_set
    from cloudbake.run.warm import find_warm_set, verify_set

    remote = remote_for(registry.address, repository="cb/warm")
    pipeline, paths, image, warm = _project_with_image(tmp_path / "baker", remote)
    push_image(remote, image, SMALL)
    tag = push_warm_set(remote, image, warm, SMALL)
    assert tag.startswith(f"{KEY}-warm-") and tag in registry.tags("cb/warm")
    # A fresh checkout of the same pipeline: the image, then the set this host would resume from.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(tmp_path / "baker" / "cloud-init", fresh / "cloud-init")
    shutil.copy(tmp_path / "baker" / "pipeline.yaml", fresh / "pipeline.yaml")
    fresh_pipeline = load_pipeline(fresh / "pipeline.yaml")
    fresh_paths = resolve_paths(fresh_pipeline)
    pulled_image = pull_image(remote, fresh_paths, "img", KEY, SMALL)
    assert pulled_image is not None
    pulled = pull_warm_set(remote, fresh_pipeline, fresh_paths, pulled_image, SMALL)
    assert pulled is not None and pulled.folder.name == warm.folder.name
    for name in ("disk.qcow2", "state.zst", "efivars.fd", "seed.iso"):
        assert (pulled.folder / name).read_bytes() == (warm.folder / name).read_bytes()
    verify_set(pulled, pulled_image)
    assert not [p for p in pulled.folder.iterdir() if p.name.startswith("id_")]
    # The registry's copy of the state altered: refused by its digest, one warning, nothing installed.
    shutil.rmtree(pulled.folder)
    record = json.loads(warm.meta.read_text())
    body = Registry(remote, SMALL).manifest(tag)
    assert body is not None
    state_layer = next(layer for layer in json.loads(body)["layers"]
                       if layer["annotations"]["dev.cloudbake.warm.file"] == "state.zst")
    blob = registry.blob_file(state_layer["digest"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="cloudbake")
    with pytest.raises(PipelineError, match="SHA-256 mismatch"):
        pull_warm_set(remote, fresh_pipeline, fresh_paths, pulled_image, replace(SMALL, http=replace(
            SMALL.http, attempts=1)))
    try_pull_warm_set(fresh_pipeline, fresh_paths, pulled_image)
    assert caplog.text.count("was not pulled") == 1
    assert find_warm_set(pulled_image, pulled.folder.name.rsplit("-", 1)[1]) is None
    assert record["sha256"]["state.zst"] != hashlib.sha256(bytes(data)).hexdigest()


def test_a_warm_set_for_another_machine_or_with_a_key_is_refused(registry, tmp_path):
    from cloudbake.remote.warmshare import pull_warm_set, push_warm_set

    remote = remote_for(registry.address, repository="cb/warm-other")
    pipeline, paths, image, warm = _project_with_image(tmp_path / "baker", remote)
    (warm.folder / "id_ed25519").write_text("PRIVATE")
    with pytest.raises(PipelineError, match="holds a private key"):
        push_warm_set(remote, image, warm, SMALL)
    (warm.folder / "id_ed25519").unlink()
    # A record that describes another machine under this host's tag (forged): refused before any file.
    record = json.loads(warm.meta.read_text())
    record["inputs"]["memory_mib"] = 8192
    warm.meta.chmod(0o644)
    warm.meta.write_text(json.dumps(record))
    push_warm_set(remote, image, warm, SMALL)
    shutil.rmtree(warm.folder)
    with pytest.raises(PipelineError, match="describes another machine than this host's; refused"):
        pull_warm_set(remote, pipeline, paths, image, SMALL)
    assert not warm.folder.exists()
