"""fetch against the fixture mirror on a real HTTP server, with real gpgv and real faults."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest

from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.core.files import is_verified
from cloudbake.source import download, ubuntu
from cloudbake.source.checksums import parse_sums
from cloudbake.source.fetch import ensure_image
from cloudbake.source.http import HttpSettings
from cloudbake.source.lock import read_lock
from cloudbake.source.openpgp import dearmor, key_fingerprints
from cloudbake.source.ubuntu import resolve_upstream
from tests.fixture.mirror import GpgKey, make_gpg_key, write_sums
from tests.fixture.server import Fault, MirrorServer

FAST = HttpSettings(connect_timeout_s=2, read_timeout_s=2, attempts=3, backoff_s=0.01)
IMAGE_PATH = "/noble/current/noble-server-cloudimg-amd64.img"


@pytest.fixture
def make(make_pipeline, tmp_path):
    def build(mirror_url: str, keyring: Path, fingerprint: str, extra: str = ""):
        text = f"""\
name: t
source:
  mirror: {mirror_url}
  verify:
    keyring: {keyring}
    fingerprints: [{fingerprint}]
cache: {{dir: {tmp_path / 'cache'}}}
{extra}"""
        pipeline = load_pipeline(make_pipeline(text))
        return pipeline, resolve_paths(pipeline)
    return build


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- resolve ------------------------------------------------------------------------------

@pytest.mark.parametrize(("release", "channel", "url"), [
    ("noble", "current", "M/noble/current/noble-server-cloudimg-amd64.img"),
    ("24.04", "current", "M/noble/current/noble-server-cloudimg-amd64.img"),
    ("noble", "20240423", "M/noble/20240423/noble-server-cloudimg-amd64.img"),
    ("24.04", "release", "M/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"),
    ("noble", "release-20240423", "M/releases/24.04/release-20240423/ubuntu-24.04-server-cloudimg-amd64.img"),
])
def test_resolve_urls(make_pipeline, release, channel, url):
    pipeline = load_pipeline(make_pipeline(f"source: {{mirror: 'http://m/', release: '{release}', channel: '{channel}'}}\n"))
    assert resolve_upstream(pipeline.source).image_url == url.replace("M/", "http://m/")


def test_unknown_version_is_an_error_at_load_time(make_pipeline):
    with pytest.raises(PipelineError, match=r"pipeline.yaml:1:19: source.release: unknown Ubuntu release '19.19'"):
        load_pipeline(make_pipeline("source: {release: '19.19'}\n"))


# --- SHA256SUMS and keys ----------------------------------------------------------------------

HEX = "ab" * 32


def test_parse_sums_accepts_every_form():
    text = f"{HEX} *a.img\n\n{HEX.upper()}  b.img\n{HEX} ./c.img\n{HEX} *./d img.img\n"
    assert parse_sums(text, "u") == {"a.img": HEX, "b.img": HEX, "c.img": HEX, "d img.img": HEX}


@pytest.mark.parametrize("line", ["abc *a.img", f"{HEX}", f"{HEX[:-1]}z *a.img"])
def test_parse_sums_rejects_malformed(line):
    with pytest.raises(PipelineError, match="u:2: malformed line"):
        parse_sums(f"{HEX} *ok.img\n{line}\n", "u")


def test_fingerprint_of_armored_key_matches_gpg(gpg_key):
    assert gpg_key.fingerprint in key_fingerprints(dearmor(gpg_key.armored.read_bytes()))
    assert key_fingerprints(gpg_key.keyring.read_bytes())[0] == gpg_key.fingerprint


# --- the happy path and the lock -------------------------------------------------------------

def test_fetch_verifies_downloads_and_pins(server, small_mirror, make):
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, lock = ensure_image(pipeline, paths, http=FAST)
    assert _digest(image) == _digest(small_mirror.image)
    assert lock.sha256 == _digest(small_mirror.image) and lock.size == image.stat().st_size
    assert lock.signed_by == small_mirror.key.fingerprint and lock.serial == small_mirror.serial
    on_disk = json.loads(paths.lock_file.read_text())
    assert on_disk["url"] == server.url + IMAGE_PATH.lstrip("/")
    assert read_lock(paths.lock_file) == lock
    assert [p.name for p in image.parent.iterdir() if p.name.endswith((".part", ".tmp"))] == []


def test_second_fetch_uses_lock_and_cache_offline(small_mirror, make):
    with MirrorServer(small_mirror.root) as srv:
        pipeline, paths = make(srv.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
        ensure_image(pipeline, paths, http=FAST)
    # The server is gone: any request would fail.
    image, lock = ensure_image(pipeline, paths, http=FAST)
    assert image.is_file() and lock.sha256 == _digest(small_mirror.image)


def test_cached_image_is_not_reread(server, small_mirror, make, monkeypatch):
    """A verified image in the cache is trusted by its record (size, mtime): not opened, not requested."""
    import builtins

    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, _ = ensure_image(pipeline, paths, http=FAST)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(image):
            pytest.fail("opened the verified image again")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    requests_before = len(server.state.requests)
    assert ensure_image(pipeline, paths, http=FAST)[0] == image
    assert len(server.state.requests) == requests_before


def test_changed_cached_file_is_not_trusted(server, small_mirror, make):
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, lock = ensure_image(pipeline, paths, http=FAST)
    with open(image, "r+b") as f:
        f.write(b"X")
    assert not is_verified(image, lock.sha256)
    server.reset()
    image, _ = ensure_image(pipeline, paths, http=FAST)
    assert _digest(image) == lock.sha256
    assert server.requests_for("amd64.img")


def test_lock_for_another_source_says_update(server, small_mirror, make):
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    ensure_image(pipeline, paths, http=FAST)
    other, _ = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint, "disk: {size: 9G}\n")
    ensure_image(other, paths, http=FAST)  # disk settings don't touch the source: the lock still holds
    moved, paths2 = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    paths2.lock_file.write_text(paths.lock_file.read_text().replace('"channel": "current"', '"channel": "release"'))
    with pytest.raises(PipelineError, match="run cloudbake update"):
        ensure_image(moved, paths2, http=FAST)


def test_lock_whose_url_serves_other_bytes(small_mirror, make, tmp_path):
    root = tmp_path / "moved"
    import shutil
    shutil.copytree(small_mirror.root, root)
    with MirrorServer(root) as srv:
        pipeline, paths = make(srv.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
        image, _ = ensure_image(pipeline, paths, http=FAST)
        image.unlink()
        target = root / IMAGE_PATH.lstrip("/")
        target.unlink()
        target.write_bytes(b"a newer image")
        with pytest.raises(PipelineError, match="no longer serves the image pinned"):
            ensure_image(pipeline, paths, http=FAST)


# --- faults --------------------------------------------------------------------------------

def test_resume_after_drop_fetches_only_missing_bytes(server, small_mirror, make):
    size = small_mirror.image.stat().st_size
    server.fail(IMAGE_PATH, Fault(drop_after=2_000_000))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, _ = ensure_image(pipeline, paths, http=FAST)
    assert _digest(image) == _digest(small_mirror.image)
    first, second = server.requests_for("amd64.img")
    assert first.bytes_sent == 2_000_000
    assert second.range == "bytes=2000000-" and second.if_range and second.status == 206
    assert second.bytes_sent == size - 2_000_000


def test_resume_across_runs(server, small_mirror, make):
    size = small_mirror.image.stat().st_size
    server.fail(IMAGE_PATH, *[Fault(drop_after=1_000_000)] * 1)
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    one_try = HttpSettings(connect_timeout_s=2, read_timeout_s=2, attempts=1)
    with pytest.raises(PipelineError, match="kept in .*part"):
        ensure_image(pipeline, paths, http=one_try)
    image, _ = ensure_image(pipeline, paths, http=one_try)
    assert _digest(image) == _digest(small_mirror.image)
    assert server.requests_for("amd64.img")[-1].bytes_sent == size - 1_000_000


def test_server_ignoring_range_restarts_cleanly(server, small_mirror, make):
    server.fail(IMAGE_PATH, Fault(drop_after=1_500_000), Fault(ignore_range=True))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, _ = ensure_image(pipeline, paths, http=FAST)
    assert _digest(image) == _digest(small_mirror.image)
    assert server.requests_for("amd64.img")[-1].status == 200


def test_changed_validator_restarts(server, small_mirror, make):
    server.fail(IMAGE_PATH, Fault(drop_after=1_500_000))
    server.state.etag_salt = "v1"
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    one_try = HttpSettings(connect_timeout_s=2, read_timeout_s=2, attempts=1)
    with pytest.raises(PipelineError):
        ensure_image(pipeline, paths, http=one_try)
    server.state.etag_salt = "v2"
    image, _ = ensure_image(pipeline, paths, http=one_try)
    assert _digest(image) == _digest(small_mirror.image)
    last = server.requests_for("amd64.img")[-1]
    assert last.range and last.status == 200


def test_flipped_byte_is_rejected_and_nothing_cached(server, small_mirror, make):
    server.fail(IMAGE_PATH, Fault(flip_byte_at=4242))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    with pytest.raises(PipelineError, match="SHA-256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        ensure_image(pipeline, paths, http=FAST)
    leftovers = [p.name for p in paths.images_cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert not paths.lock_file.exists()


def test_404_names_the_url(server, small_mirror, make):
    server.fail("/noble/current/SHA256SUMS", Fault(status=404))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    with pytest.raises(PipelineError, match=r"not found \(404\): http://127.0.0.1:\d+/noble/current/SHA256SUMS"):
        ensure_image(pipeline, paths, http=FAST)


def test_stall_hits_read_timeout(server, small_mirror, make):
    server.fail(IMAGE_PATH, Fault(stall_s=3))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    settings = HttpSettings(connect_timeout_s=2, read_timeout_s=0.5, attempts=1)
    with pytest.raises(PipelineError, match=r"no data from .*amd64.img for 0.5 s \(read timeout\)"):
        ensure_image(pipeline, paths, http=settings)


def test_500_then_recovery(server, small_mirror, make):
    server.fail(IMAGE_PATH, Fault(status=500), Fault(status=503))
    server.fail("/noble/current/SHA256SUMS", Fault(status=502))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, _ = ensure_image(pipeline, paths, http=FAST)
    assert _digest(image) == _digest(small_mirror.image)
    assert [r.status for r in server.requests_for("amd64.img")] == [500, 503, 200]


def test_persistent_500_gives_up_with_the_status(server, small_mirror, make):
    server.fail(IMAGE_PATH, *[Fault(status=500)] * 3)
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    with pytest.raises(PipelineError, match="answered 500.*gave up after 3 attempts"):
        ensure_image(pipeline, paths, http=FAST)


# --- trust ---------------------------------------------------------------------------------

def test_signature_by_another_key_is_rejected_and_image_never_requested(server, small_mirror, make, other_gpg_key):
    pipeline, paths = make(server.url, other_gpg_key.keyring, other_gpg_key.fingerprint)
    with pytest.raises(PipelineError, match="not in the keyring"):
        ensure_image(pipeline, paths, http=FAST)
    assert server.requests_for("amd64.img") == []


def test_key_in_keyring_but_not_pinned_is_rejected(server, small_mirror, make, other_gpg_key):
    pipeline, paths = make(server.url, small_mirror.key.keyring, other_gpg_key.fingerprint)
    with pytest.raises(PipelineError, match="not in source.verify.fingerprints"):
        ensure_image(pipeline, paths, http=FAST)
    assert server.requests_for("amd64.img") == []


def _tamper_a_digest(folder: Path, key: GpgKey) -> None:
    """A digest changed after signing: the signature no longer covers the file."""
    sums = folder / "SHA256SUMS"
    text = sums.read_text()
    sums.write_text(text.replace(text[0], "0" if text[0] != "0" else "1", 1))


def _sums_without_the_image(folder: Path, key: GpgKey) -> None:
    """Sums signed by the right key that name another file only."""
    write_sums(folder, {"other.img": "0" * 64}, key)


@pytest.mark.parametrize(("alter", "message"), [
    (_tamper_a_digest, "does not match SHA256SUMS"),
    (_sums_without_the_image, "has no entry for noble-server-cloudimg-amd64.img"),
])
def test_sums_that_do_not_vouch_for_the_image_are_refused(small_mirror, make, tmp_path, alter, message):
    import shutil
    root = tmp_path / "mirror"
    shutil.copytree(small_mirror.root, root)
    alter(root / "noble" / "current", small_mirror.key)
    with MirrorServer(root) as srv:
        pipeline, paths = make(srv.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
        with pytest.raises(PipelineError, match=message):
            ensure_image(pipeline, paths, http=FAST)
        assert srv.requests_for("amd64.img") == []


def test_sha256_pin_must_agree(server, small_mirror, make):
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    pinned, _ = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    from dataclasses import replace
    bad = replace(pinned, source=replace(pinned.source, verify=replace(pinned.source.verify, sha256="0" * 64)))
    with pytest.raises(PipelineError, match="source.verify.sha256 pins 0000"):
        ensure_image(bad, paths, http=FAST)


def test_armored_keyring_and_binary_signature(small_mirror, make, tmp_path):
    import shutil
    root = tmp_path / "binsig"
    shutil.copytree(small_mirror.root, root)
    small_mirror.key.sign(root / "noble" / "current" / "SHA256SUMS", armor=False)
    with MirrorServer(root) as srv:
        pipeline, paths = make(srv.url, small_mirror.key.armored, small_mirror.key.fingerprint)
        image, lock = ensure_image(pipeline, paths, http=FAST)
        assert lock.signed_by == small_mirror.key.fingerprint


def test_signature_off_warns_loudly(server, small_mirror, make, caplog, other_gpg_key):
    pipeline, paths = make(server.url, other_gpg_key.keyring, other_gpg_key.fingerprint,
                           "")
    from dataclasses import replace

    from cloudbake.config.model import SignaturePolicy
    off = replace(pipeline, source=replace(pipeline.source, verify=replace(pipeline.source.verify,
                                                                           signature=SignaturePolicy.off)))
    image, lock = ensure_image(off, paths, http=FAST)
    assert "SIGNATURE CHECK OFF" in caplog.text
    assert lock.signed_by is None
    assert server.requests_for("SHA256SUMS.gpg") == []


def test_key_from_keyserver_is_trusted_only_by_fingerprint(server, small_mirror, make, monkeypatch, tmp_path):
    """The keyserver is unreachable here: the local server stands in for it, serving the armored key."""
    keyserver = tmp_path / "ks"
    (keyserver / "pks").mkdir(parents=True)
    (keyserver / "pks" / "lookup").write_bytes(small_mirror.key.armored.read_bytes())
    monkeypatch.setattr(ubuntu, "SYSTEM_KEYRING", tmp_path / "absent.gpg")
    with MirrorServer(keyserver) as ks:
        monkeypatch.setattr(ubuntu, "KEYSERVER_URL", ks.url + "pks/lookup?search=0x{fingerprint}")
        pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
        from dataclasses import replace
        no_keyring = replace(pipeline, source=replace(pipeline.source, verify=replace(pipeline.source.verify,
                                                                                      keyring=None)))
        image, lock = ensure_image(no_keyring, paths, http=FAST)
        assert lock.signed_by == small_mirror.key.fingerprint
        assert (paths.cache_dir / "keys" / f"{small_mirror.key.fingerprint}.gpg").is_file()
        # A keyserver answer with another key is refused.
        wrong = make_gpg_key(tmp_path / "wrong", "wrong")
        (keyserver / "pks" / "lookup").write_bytes(wrong.armored.read_bytes())
        (paths.cache_dir / "keys" / f"{small_mirror.key.fingerprint}.gpg").unlink()
        paths.lock_file.unlink()
        with pytest.raises(PipelineError, match="not .* refusing it"):
            ensure_image(no_keyring, paths, http=FAST)


# --- concurrency ------------------------------------------------------------------------------

def _fetch_in_process(pipeline_file: str, queue) -> None:
    from cloudbake.config.paths import resolve_paths
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.source.fetch import ensure_image
    from cloudbake.source.http import HttpSettings
    pipeline = load_pipeline(pipeline_file)
    try:
        image, _ = ensure_image(pipeline, resolve_paths(pipeline), http=HttpSettings(attempts=2, backoff_s=0.01))
        queue.put(str(image))
    except Exception as err:  # reported to the parent
        queue.put(f"error: {err}")


def test_concurrent_fetches_do_not_corrupt(server, small_mirror, make):
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(str(pipeline.file), queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert len(set(results)) == 1 and not results[0].startswith("error"), results
    assert _digest(Path(results[0])) == _digest(small_mirror.image)
    assert len(server.requests_for("amd64.img")) == 1


def test_doit_fetch_then_offline(small_mirror, make):
    import subprocess
    import sys

    from tests.conftest import PROJECT
    with MirrorServer(small_mirror.root) as srv:
        pipeline, paths = make(srv.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
        argv = [sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), "fetch", f"pipeline={pipeline.file}"]
        first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert paths.lock_file.is_file()
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)  # the server is gone now
    assert second.returncode == 0, second.stderr
    assert "-- fetch" in second.stdout  # doit: up to date, the pinned image is cached and verified


# --- signatures gpgv refuses even beside VALIDSIG ----------------------------------------------

def test_signature_by_a_revoked_key_is_refused(tmp_path):
    """A real key, a real signature, then the key's real revocation imported: gpgv still says VALIDSIG
    (the maths holds) but also REVKEYSIG, and that refuses it."""
    from cloudbake.source.openpgp import check_signature
    from tests.fixture.mirror import make_gpg_key

    key = make_gpg_key(tmp_path / "gnupg", "revoked")
    data = tmp_path / "SHA256SUMS"
    data.write_text(f"{'a' * 64} *x.img\n")
    signature = key.sign(data).read_bytes()
    assert check_signature(data.read_bytes(), signature, key.keyring, (key.fingerprint,)).fingerprint
    revocation = (key.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_text()
    cert = tmp_path / "revoke.asc"
    cert.write_text(revocation.replace(":-----BEGIN", "-----BEGIN"))
    base = ["gpg", "--homedir", str(key.home), "--batch"]
    subprocess.run([*base, "--import", str(cert)], check=True, capture_output=True)
    revoked_keyring = tmp_path / "revoked.gpg"
    revoked_keyring.write_bytes(subprocess.run([*base, "--export", key.fingerprint], check=True,
                                               capture_output=True).stdout)
    with pytest.raises(PipelineError, match=r"revoked \(gpgv: REVKEYSIG\)"):
        check_signature(data.read_bytes(), signature, revoked_keyring, (key.fingerprint,))


@pytest.mark.parametrize("code", ["REVKEYSIG", "EXPKEYSIG", "EXPSIG", "BADSIG", "ERRSIG"])
def test_refusing_status_wins_over_validsig(tmp_path, monkeypatch, code):
    """A stand-in gpgv that prints VALIDSIG for the pinned key and one refusing code, exit 0."""
    from cloudbake.source.openpgp import check_signature

    fpr = "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"
    gpgv = tmp_path / "bin" / "gpgv"
    gpgv.parent.mkdir()
    gpgv.write_text(f"#!/bin/sh\necho '[GNUPG:] NEWSIG'\necho '[GNUPG:] {code} 7DB87C81 someone'\n"
                    f"echo '[GNUPG:] VALIDSIG {fpr} 2026-11-01 1793000000 0 4 0 22 8 00 {fpr}'\nexit 0\n")
    gpgv.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gpgv.parent}:{os.environ['PATH']}")
    with pytest.raises(PipelineError, match=f"gpgv: {code}"):
        check_signature(b"sums", b"sig", tmp_path / "keyring.gpg", (fpr,))


@pytest.mark.parametrize(("change", "fragment"), [
    ({"sha256": None}, "sha256 must be 64 lowercase hex digits"),
    ({"sha256": "../../../../etc/passwd" + "0" * 42}, "sha256 must be 64 lowercase hex digits"),
    ({"sha256": "A" * 64}, "sha256 must be 64 lowercase hex digits"),
    ({"url": "ftp://x/y.img"}, "url must be an http(s)"),
    ({"size": "12"}, "size must be a number of bytes"),
    ({"serial": 20261128}, "serial must be a string or null"),
    ({"source": ["noble"]}, "source must be a mapping"),
])
def test_hostile_lock_values_are_refused(tmp_path, change, fragment):
    from cloudbake.source.lock import Lock, read_lock, write_lock

    lock_file = tmp_path / "pipeline.lock"
    write_lock(lock_file, Lock({"release": "noble"}, "http://m/x.img", "1", "a" * 64, 10, None, None))
    data = json.loads(lock_file.read_text())
    lock_file.write_text(json.dumps({**data, **change}))
    with pytest.raises(PipelineError) as caught:
        read_lock(lock_file)
    assert "not a valid cloudbake lock file" in str(caught.value) and fragment in str(caught.value)


@pytest.mark.parametrize("text", ["[]", "\xff", "null"])
def test_lock_that_is_not_a_lock(tmp_path, text):
    from cloudbake.source.lock import read_lock

    (tmp_path / "pipeline.lock").write_bytes(text.encode("latin-1"))
    with pytest.raises(PipelineError, match="not a valid cloudbake lock file"):
        read_lock(tmp_path / "pipeline.lock")


@pytest.mark.parametrize(("data", "what"), [
    (b"-----BEGIN PGP SIGNATURE-----\n\n!!!not base64!!!\n-----END PGP SIGNATURE-----\n", "SHA256SUMS.gpg"),
    (b"-----BEGIN PGP SIGNATURE-----", "SHA256SUMS.gpg"),
])
def test_malformed_armor_is_a_clear_error(tmp_path, data, what):
    from cloudbake.source.openpgp import check_signature

    with pytest.raises(PipelineError, match=f"{what}: malformed ASCII armor"):
        check_signature(b"sums", data, tmp_path / "keyring.gpg", ("A" * 40,))


def test_keyserver_key_is_refreshed_after_a_week(make_pipeline, tmp_path, gpg_key, monkeypatch, caplog):
    """A cached keyserver key younger than KEY_REFRESH_S is used as is; an older one is fetched again
    (so a revocation can arrive); when the keyserver cannot be reached the old copy is used with a warning."""
    import time

    import requests

    keys = tmp_path / "keyserver"
    keys.mkdir()
    (keys / "key.asc").write_bytes(gpg_key.armored.read_bytes())
    pipeline = load_pipeline(make_pipeline(f"source: {{verify: {{fingerprints: [{gpg_key.fingerprint}]}}}}\n"
                                           f"cache: {{dir: {tmp_path / 'cache'}}}\n"))
    paths = resolve_paths(pipeline)
    monkeypatch.setattr(ubuntu, "SYSTEM_KEYRING", tmp_path / "absent.gpg")
    cached = paths.cache_dir / "keys" / f"{gpg_key.fingerprint}.gpg"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(gpg_key.keyring.read_bytes())
    with MirrorServer(keys) as srv, requests.Session() as session:
        monkeypatch.setattr(ubuntu, "KEYSERVER_URL", srv.url + "key.asc?{fingerprint}")
        assert ubuntu.resolve_keyring(pipeline, paths, session, FAST) == cached
        assert srv.state.requests == []
        week_old = time.time() - ubuntu.KEY_REFRESH_S - 60
        os.utime(cached, (week_old, week_old))
        assert ubuntu.resolve_keyring(pipeline, paths, session, FAST) == cached
        assert len(srv.state.requests) == 1 and cached.stat().st_mtime > week_old + 3600
        # A copy restored from a runner whose clock ran a year ahead is not fresh for a year: refreshed now.
        year_ahead = time.time() + 365 * 86400
        os.utime(cached, (year_ahead, year_ahead))
        assert ubuntu.resolve_keyring(pipeline, paths, session, FAST) == cached
        assert len(srv.state.requests) == 2 and cached.stat().st_mtime < year_ahead
        os.utime(cached, (week_old, week_old))
        monkeypatch.setattr(ubuntu, "KEYSERVER_URL", "http://127.0.0.1:9/key?{fingerprint}")
        assert ubuntu.resolve_keyring(pipeline, paths, session, FAST) == cached
    assert "could not refresh signing key" in caplog.text


def test_mirror_credentials_are_used_but_never_stored_or_logged(server, small_mirror, make, caplog):
    """user:secret@ in source.mirror authenticates every request, and appears in no log line, lock or error."""
    import base64

    from cloudbake.core.log import redact

    secret_url = server.url.replace("http://", "http://builder:s3cr3t@")
    pipeline, paths = make(secret_url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    ensure_image(pipeline, paths, http=FAST)
    expected = "Basic " + base64.b64encode(b"builder:s3cr3t").decode()
    assert server.state.requests and all(r.authorization == expected for r in server.state.requests)
    lock_text = paths.lock_file.read_text()
    assert "s3cr3t" not in lock_text and "builder" not in lock_text
    assert "s3cr3t" not in caplog.text
    # The lock pins the plain URL; a later download from it gets the credentials back.
    for image in paths.images_cache.iterdir():
        image.unlink()
    server.state.requests.clear()
    ensure_image(pipeline, paths, http=FAST)
    assert any(r.path.endswith(".img") and r.authorization == expected for r in server.state.requests)
    # Errors that name the URL are redacted where they reach the user.
    assert redact(f"not found (404): {secret_url}x") == f"not found (404): {server.url.replace('http://', 'http://***@')}x"


def test_update_refuses_an_older_signed_set_unless_asked(server, small_mirror, make):
    from dataclasses import replace

    from cloudbake.source.lock import read_lock, write_lock

    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    _, current = ensure_image(pipeline, paths, http=FAST)
    newer = replace(current, serial="99991231", signature_time="2099-01-01T00:00:00Z")
    write_lock(paths.lock_file, newer)
    with pytest.raises(PipelineError) as caught:
        ensure_image(pipeline, paths, update=True, http=FAST)
    message = str(caught.value)
    assert "older image than the one pinned" in message and "99991231" in message and "2099-01-01" in message
    assert str(current.signature_time) in message and "update --downgrade" in message
    assert read_lock(paths.lock_file) == newer
    ensure_image(pipeline, paths, update=True, allow_downgrade=True, http=FAST)
    assert read_lock(paths.lock_file) == current


@pytest.mark.parametrize(("pinned", "resolved", "refused"), [
    (("20240423", "2024-04-23T00:00:00Z"), ("20240101", "2024-04-24T00:00:00Z"), True),
    (("20240423", "2024-04-23T00:00:00Z"), ("20240423.1", "2024-04-22T00:00:00Z"), True),
    (("20240423", "2024-04-23T00:00:00Z"), ("20240501", "2024-05-01T00:00:00Z"), False),
    ((None, None), ("20240101", None), False),
])
def test_older_serial_or_signature_time(pinned, resolved, refused):
    from cloudbake.source.lock import Lock, check_not_older

    old = Lock({"release": "noble"}, "http://m/x.img", pinned[0], "a" * 64, 1, None, pinned[1])
    new = Lock({"release": "noble"}, "http://m/x.img", resolved[0], "b" * 64, 1, None, resolved[1])
    if refused:
        with pytest.raises(PipelineError, match="older image"):
            check_not_older(old, new, allow_downgrade=False)
        check_not_older(old, new, allow_downgrade=True)
    else:
        check_not_older(old, new, allow_downgrade=False)


# --- transfers: size caps, trickles, broken headers ---------------------------------------------

def test_trickling_server_is_cut_off_then_resumed(server, small_mirror, make):
    """50 KiB/s never trips a 2 s read timeout; the minimum rate cuts the attempt, the retry resumes."""
    server.fail(IMAGE_PATH, Fault(trickle_bytes_s=50 << 10))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    settings = HttpSettings(connect_timeout_s=2, read_timeout_s=2, attempts=2, backoff_s=0.01,
                            min_rate_bytes_s=1 << 20, rate_window_s=1.0)
    image, _ = ensure_image(pipeline, paths, http=settings)
    assert _digest(image) == _digest(small_mirror.image)
    # The server records a request when its handler ends; the cut-off one ends at its next write.
    deadline = time.monotonic() + 30
    while len(server.requests_for("amd64.img")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    gets = server.requests_for("amd64.img")
    first, resumed = sorted(gets, key=lambda g: g.range is not None)
    assert first.range is None and resumed.range is not None
    assert 0 < int(resumed.range.removeprefix("bytes=").rstrip("-")) <= first.bytes_sent


def test_trickle_that_never_recovers_is_an_error(server, small_mirror, make):
    server.fail(IMAGE_PATH, Fault(trickle_bytes_s=50 << 10))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    settings = HttpSettings(connect_timeout_s=2, read_timeout_s=2, attempts=1, min_rate_bytes_s=1 << 20,
                            rate_window_s=1.0)
    with pytest.raises(PipelineError, match=r"slower than 1.0 MiB/s; cut off"):
        ensure_image(pipeline, paths, http=settings)


def test_download_never_grows_past_the_pinned_size(server, small_mirror, make):
    """The lock pins the size: a server that sends more is cut off at that size, and nothing is kept."""
    from dataclasses import replace

    from cloudbake.source.lock import write_lock

    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    image, lock = ensure_image(pipeline, paths, http=FAST)
    image.unlink()
    write_lock(paths.lock_file, replace(lock, size=1 << 20))
    with pytest.raises(PipelineError, match="announces 6.0 MiB, more than the 1.0 MiB the lock pins"):
        ensure_image(pipeline, paths, http=FAST)
    server.fail(IMAGE_PATH, Fault(content_length="1000"), Fault(content_length="1000"))
    write_lock(paths.lock_file, replace(lock, size=500))
    with pytest.raises(PipelineError, match="announces 1000 B, more than the 500 B the lock pins"):
        ensure_image(pipeline, paths, http=FAST)
    assert not list(paths.images_cache.glob("*.part"))


def test_unpinned_download_is_capped(server, small_mirror, make, monkeypatch):
    monkeypatch.setattr(download, "UNPINNED_MAX_BYTES", 1 << 20)
    server.fail(IMAGE_PATH, Fault(content_length=None))
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    with pytest.raises(PipelineError, match="more than the 1.0 MiB allowed"):
        ensure_image(pipeline, paths, http=FAST)
    assert not list(paths.images_cache.glob("*.part"))


@pytest.mark.parametrize(("fault", "fragment"), [
    (Fault(content_length="-5"), "malformed Content-Length ('-5')"),
    (Fault(content_length="12abc"), "malformed Content-Length"),
    (Fault(content_encoding="gzip"), "Content-Encoding: gzip"),
])
def test_broken_headers_are_clear_errors(server, small_mirror, make, fault, fragment):
    server.fail(IMAGE_PATH, fault)
    pipeline, paths = make(server.url, small_mirror.key.keyring, small_mirror.key.fingerprint)
    with pytest.raises(PipelineError) as caught:
        ensure_image(pipeline, paths, http=FAST)
    assert fragment in str(caught.value)


def test_every_distribution_is_one_table_entry_one_module_and_in_the_schema():
    """The recipe of docs/architecture.md holds: the schema admits exactly the distributions of the facts
    table, each has a source module behind the one signature, and no code above source/ and config/ names one."""
    import inspect
    import json
    import re

    from cloudbake.config.distros import DISTROS
    from cloudbake.config.model import Distro
    from cloudbake.config.schemas import pipeline_schema_path
    from cloudbake.source.fetch import SOURCES
    from tests.conftest import PROJECT

    schema = json.loads(pipeline_schema_path().read_text())
    assert set(schema["properties"]["source"]["properties"]["distro"]["enum"]) == {d.value for d in DISTROS}
    assert set(DISTROS) == set(SOURCES) == set(Distro)
    signatures = {str(inspect.signature(resolver)) for resolver in SOURCES.values()}
    assert len(signatures) == 1, signatures
    named = re.compile(r"""["'](ubuntu|debian|fedora)["']|Distro\.(ubuntu|debian|fedora)""")
    for file in (PROJECT / "cloudbake").rglob("*.py"):
        if file.parent.name in ("source", "config"):
            continue
        assert not named.search(file.read_text()), file
