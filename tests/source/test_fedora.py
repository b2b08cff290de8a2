"""Fedora's source against a mirror in its layout on 127.0.0.1: the newest build from the folder's
listing, its clear-signed CHECKSUM verified by gpgv against the pinned key before a line is read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.source.fedora import newest_build
from cloudbake.source.fetch import ensure_image
from cloudbake.source.http import HttpSettings
from tests.fixture.distros import FEDORA_RELEASE, build_fedora_mirror, write_fedora_checksum
from tests.fixture.mirror import GpgKey
from tests.fixture.server import MirrorServer

FAST = HttpSettings(connect_timeout_s=5, read_timeout_s=10, attempts=2, backoff_s=0.05)
NEWEST = f"Fedora-Cloud-Base-Generic-{FEDORA_RELEASE}-1.10.x86_64.qcow2"


@pytest.fixture
def fedora(tmp_path: Path, gpg_key: GpgKey):
    image = tmp_path / "image.qcow2"
    image.write_bytes(os.urandom(3 << 20))
    folder = build_fedora_mirror(tmp_path / "mirror", image, gpg_key)
    with MirrorServer(tmp_path / "mirror") as server:
        yield server, image, folder


def _pipeline(make_pipeline, tmp_path: Path, url: str, key: GpgKey, fingerprint: str | None = None,
              channel: str = "current"):
    pipeline = load_pipeline(make_pipeline(f"""\
        name: fed
        source:
          distro: fedora
          release: {FEDORA_RELEASE}
          channel: '{channel}'
          mirror: '{url}'
          verify: {{keyring: {key.armored}, fingerprints: [{fingerprint or key.fingerprint}]}}
        cache: {{dir: {tmp_path / 'cache'}}}
        """))
    return pipeline, resolve_paths(pipeline)


def test_the_newest_build_is_fetched_with_its_signed_checksum(fedora, make_pipeline, tmp_path, gpg_key):
    server, image, _ = fedora
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key)
    cached, lock = ensure_image(pipeline, paths, http=FAST)
    assert lock.url.endswith(NEWEST) and lock.serial == "1.10", "1.10 is newer than 1.9"
    assert lock.sha256 == hashlib.sha256(image.read_bytes()).hexdigest() == hashlib.sha256(
        cached.read_bytes()).hexdigest()
    assert lock.signed_by == gpg_key.fingerprint and lock.source["distro"] == "fedora"


def test_a_named_build_is_taken_as_it_is(fedora, make_pipeline, tmp_path, gpg_key):
    server, _, _ = fedora
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key, channel="1.9")
    assert ensure_image(pipeline, paths, http=FAST)[1].url.endswith(f"{FEDORA_RELEASE}-1.9.x86_64.qcow2")


def test_a_bad_signature_is_refused_before_the_image(fedora, make_pipeline, tmp_path, gpg_key):
    server, _, folder = fedora
    checksum = folder / f"Fedora-Cloud-{FEDORA_RELEASE}-1.10-x86_64-CHECKSUM"
    checksum.write_text(checksum.read_text().replace("SHA256 (Fedora-Cloud-Base", "SHA256  (Fedora-Cloud-Base", 1))
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key)
    with pytest.raises(PipelineError, match="signature check failed"):
        ensure_image(pipeline, paths, http=FAST)
    assert server.requests_for(".qcow2") == []


def test_a_signature_by_another_key_is_refused(fedora, make_pipeline, tmp_path, gpg_key, other_gpg_key):
    server, _, _ = fedora
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key, fingerprint=other_gpg_key.fingerprint)
    with pytest.raises(PipelineError, match="not in source.verify.fingerprints"):
        ensure_image(pipeline, paths, http=FAST)
    assert server.requests_for(".qcow2") == []


def test_lines_for_other_files_and_unsigned_text_are_ignored(fedora, make_pipeline, tmp_path, gpg_key):
    """The signed CHECKSUM lists other files too; a line appended after the signature, naming our image
    with another digest, is not signed and never read."""
    server, image, folder = fedora
    name = NEWEST
    forged = f"\nSHA256 ({name}) = {'e' * 64}\n"
    write_fedora_checksum(folder, "1.10", {"Fedora-Cloud-Base-Generic.raw.xz": "2" * 64,
                                          name: hashlib.sha256(image.read_bytes()).hexdigest()}, gpg_key,
                          outside=forged)
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key)
    assert ensure_image(pipeline, paths, http=FAST)[1].sha256 == hashlib.sha256(image.read_bytes()).hexdigest()


def test_a_checksum_without_our_image_is_a_clear_error(fedora, make_pipeline, tmp_path, gpg_key):
    server, _, folder = fedora
    write_fedora_checksum(folder, "1.10", {"Fedora-Cloud-Base-Generic.raw.xz": "2" * 64}, gpg_key)
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key)
    with pytest.raises(PipelineError, match=f"has no SHA256 line for {NEWEST}"):
        ensure_image(pipeline, paths, http=FAST)


def test_a_listing_without_builds_is_a_clear_error(fedora, make_pipeline, tmp_path, gpg_key):
    server, _, folder = fedora
    (folder / "index.html").write_text("<html>nothing here</html>")
    pipeline, paths = _pipeline(make_pipeline, tmp_path, server.url, gpg_key)
    with pytest.raises(PipelineError, match="lists no Fedora-Cloud-42-"):
        ensure_image(pipeline, paths, http=FAST)


def test_newest_build_orders_numerically():
    listing = "Fedora-Cloud-42-1.9-x86_64-CHECKSUM Fedora-Cloud-42-1.10-x86_64-CHECKSUM " \
              "Fedora-Cloud-42-2.0-aarch64-CHECKSUM Fedora-Cloud-41-9.9-x86_64-CHECKSUM"
    assert newest_build(listing, "42", "x86_64") == "1.10"
    assert newest_build(listing, "43", "x86_64") is None


def test_each_release_has_its_own_pinned_key(make_pipeline):
    pipeline = load_pipeline(make_pipeline("source: {distro: fedora, release: 41}\n"))
    assert pipeline.source.verify.fingerprints == ("466CF2D8B60BC3057AA9453ED0622462E99D6AD1",)
    assert pipeline.source.mirror == "https://download.fedoraproject.org/pub/fedora/linux/"
    with pytest.raises(PipelineError, match="unknown Fedora release '39'"):
        load_pipeline(make_pipeline("source: {distro: fedora, release: 39}\n"))


def test_a_listing_with_an_absurd_build_number_is_skipped_not_a_traceback():
    """A hostile listing: a 5,000-digit build would end int() in a ValueError before any signature check."""
    listing = (f'<a href="Fedora-Cloud-42-{"9" * 5000}-x86_64-CHECKSUM">x</a>\n'
               '<a href="Fedora-Cloud-42-1.1-x86_64-CHECKSUM">x</a>\n'
               f'<a href="Fedora-Cloud-42-1.{"9" * 12}-x86_64-CHECKSUM">x</a>\n')
    assert newest_build(listing, "42", "x86_64") == "1.1"
    assert newest_build(f'Fedora-Cloud-42-{"1" * 40}-x86_64-CHECKSUM', "42", "x86_64") is None
