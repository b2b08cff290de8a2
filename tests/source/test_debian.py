"""Debian's source against a mirror in cloud.debian.org's layout on 127.0.0.1: SHA512SUMS, which nothing
signs, trusted only as the pipeline says (`signature: none`), then pinned by the lock."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.image.build import image_settings
from cloudbake.source.debian import check_transport
from cloudbake.source.fetch import ensure_image
from cloudbake.source.http import HttpSettings
from cloudbake.source.lock import read_lock
from tests.fixture.distros import DEBIAN_BUILD, build_debian_mirror
from tests.fixture.server import MirrorServer

FAST = HttpSettings(connect_timeout_s=5, read_timeout_s=10, attempts=2, backoff_s=0.05)
LATEST = "bookworm/latest/debian-12-genericcloud-amd64.qcow2"


@pytest.fixture
def debian(tmp_path: Path):
    image = tmp_path / "image.qcow2"
    image.write_bytes(os.urandom(3 << 20))
    build_debian_mirror(tmp_path / "mirror", image)
    with MirrorServer(tmp_path / "mirror") as server:
        yield server, image


def _pipeline(make_pipeline, tmp_path: Path, url: str, source: str = ""):
    pipeline = load_pipeline(make_pipeline(f"""\
        name: deb
        source: {{distro: debian, release: bookworm, mirror: '{url}', verify: {{signature: none}}{source}}}
        cache: {{dir: {tmp_path / 'cache'}}}
        """))
    return pipeline, resolve_paths(pipeline)


def test_the_latest_build_is_fetched_against_sha512sums_and_pinned_by_its_sha256(debian, make_pipeline, tmp_path):
    server, image = debian
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url)
    cached, lock = ensure_image(pipeline, paths, http=FAST)
    assert cached.read_bytes() == image.read_bytes()
    assert lock.sha256 == hashlib.sha256(image.read_bytes()).hexdigest() and lock.signed_by is None
    assert lock.url.endswith(LATEST) and lock.serial == DEBIAN_BUILD   # from the image's JSON manifest
    assert lock.source["distro"] == "debian" and read_lock(paths.lock_file) == lock
    assert image_settings(pipeline)["distro"] == "debian", "the key covers the distribution"
    # Pinned: the next fetch needs neither the sums nor the network.
    before = len(server.state.requests)
    assert ensure_image(pipeline, paths, http=FAST)[0] == cached and len(server.state.requests) == before


def test_a_dated_build_is_its_own_folder(debian, make_pipeline, tmp_path):
    server, _ = debian
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, f", channel: '{DEBIAN_BUILD}'")
    _, lock = ensure_image(pipeline, paths, http=FAST)
    assert lock.url.endswith(f"bookworm/{DEBIAN_BUILD}/debian-12-genericcloud-amd64-{DEBIAN_BUILD}.qcow2")
    assert lock.serial == DEBIAN_BUILD


def test_a_tampered_sum_is_refused_and_nothing_is_kept(debian, make_pipeline, tmp_path):
    server, image = debian
    sums = server.state.root / "bookworm" / "latest" / "SHA512SUMS"
    real = hashlib.sha512(image.read_bytes()).hexdigest()
    sums.write_text(sums.read_text().replace(real, "f" * 128))
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url)
    with pytest.raises(PipelineError, match="SHA512 mismatch"):
        ensure_image(pipeline, paths, http=FAST)
    assert not paths.lock_file.exists()
    assert [p for p in paths.images_cache.iterdir() if p.suffix == ".qcow2"] == []


def test_only_an_update_moves_the_pin(debian, make_pipeline, tmp_path):
    """The mirror publishes new bytes with matching sums: the lock still pins the first fetch's digest."""
    server, image = debian
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url)
    _, first = ensure_image(pipeline, paths, http=FAST)
    newer = tmp_path / "newer.qcow2"
    newer.write_bytes(os.urandom(3 << 20))
    shutil.rmtree(server.state.root)
    build_debian_mirror(server.state.root, newer)
    shutil.rmtree(paths.images_cache)
    with pytest.raises(PipelineError, match="no longer serves the image pinned"):
        ensure_image(pipeline, paths, http=FAST)
    _, moved = ensure_image(pipeline, paths, update=True, allow_downgrade=True, http=FAST)
    assert moved.sha256 == hashlib.sha256(newer.read_bytes()).hexdigest() != first.sha256


def test_without_signature_none_the_pipeline_is_refused_with_the_reason(make_pipeline):
    with pytest.raises(PipelineError) as caught:
        load_pipeline(make_pipeline("source: {distro: debian, release: bookworm}\n"))
    assert "Debian publishes no signature" in str(caught.value)
    assert "source.verify.signature: none" in str(caught.value)


@pytest.mark.parametrize(("text", "fragment"), [
    ("source: {distro: debian, release: jessie, verify: {signature: none}}\n", "unknown Debian release 'jessie'"),
    ("source: {distro: debian, release: bookwrm, verify: {signature: none}}\n", "did you mean 'bookworm'?"),
    ("source: {distro: debian, release: bookworm, channel: release, verify: {signature: none}}\n",
     "'release' is not a Debian channel"),
    ("source: {distro: ubuntu, verify: {signature: none}}\n", "none is for distributions that sign nothing"),
])
def test_debian_values_are_checked_at_load(make_pipeline, text, fragment):
    with pytest.raises(PipelineError) as caught:
        load_pipeline(make_pipeline(text))
    assert fragment in str(caught.value)


def test_a_version_names_the_same_release(make_pipeline):
    pipeline = load_pipeline(make_pipeline("source: {distro: debian, release: 12, verify: {signature: none}}\n"))
    assert pipeline.source.release == "12" and pipeline.source.mirror == "https://cloud.debian.org/images/cloud/"


@pytest.mark.parametrize(("mirror", "refused"), [
    ("https://cloud.debian.org/images/cloud/", False),
    ("http://127.0.0.1:8080/", False),
    ("file:///srv/mirror/", False),
    ("http://mirror.example.org/debian/", True),
])
def test_unsigned_sums_come_only_over_tls_or_from_this_machine(mirror, refused):
    if refused:
        with pytest.raises(PipelineError, match="plain HTTP, and Debian signs nothing"):
            check_transport(mirror)
    else:
        check_transport(mirror)


def test_a_redirect_from_tls_to_plain_http_is_refused():
    """The session every source fetch uses never follows https:// to http://."""
    import requests

    from cloudbake.source.http import make_session

    answer = requests.Response()
    answer.url, answer.status_code = "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS", 302
    answer.headers["Location"] = "http://mirror.example.org/SHA512SUMS"
    with make_session() as session, pytest.raises(PipelineError, match="from TLS to plain HTTP; refused"):
        session.get_redirect_target(answer)
    answer.headers["Location"] = "https://mirror.example.org/SHA512SUMS"
    with make_session() as session:
        assert session.get_redirect_target(answer) == "https://mirror.example.org/SHA512SUMS"


def test_an_update_never_moves_a_debian_pin_back_to_an_older_build(debian, make_pipeline, tmp_path):
    """A stale mirror whose latest/ is an older build: the update refuses (as for Ubuntu and Fedora) unless
    --downgrade; the build id is the manifest's version label, not the first date-like string in it."""
    import json

    from cloudbake.source.debian import build_from_manifest

    server, image = debian
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url)
    _, first = ensure_image(pipeline, paths, http=FAST)
    assert first.serial == DEBIAN_BUILD
    manifest = server.state.root / "bookworm" / "latest" / "debian-12-genericcloud-amd64.json"
    older = "20240101-0001"
    manifest.write_text(json.dumps({"kind": "Build", "metadata": {"description": "rebuilt 29991231-2359"},
                                    "items": [{"metadata": {"labels": {"cloud.debian.org/version": older}}}]}))
    with pytest.raises(PipelineError, match="older image than the one pinned"):
        ensure_image(pipeline, paths, update=True, http=FAST)
    assert read_lock(paths.lock_file) == first
    _, moved = ensure_image(pipeline, paths, update=True, allow_downgrade=True, http=FAST)
    assert moved.serial == older
    assert build_from_manifest(b'{"note": "20991231-2359", "items": []}') is None
