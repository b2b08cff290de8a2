"""The test infrastructure itself: the mirror's layout and signatures, and the server's faults."""

from __future__ import annotations

import subprocess

import requests

from tests.fixture.server import Fault


def test_mirror_has_ubuntu_layout(small_mirror):
    current = small_mirror.root / "noble" / "current"
    assert (current / "noble-server-cloudimg-amd64.img").is_file()
    sums = (current / "SHA256SUMS").read_text().splitlines()
    assert len(sums) >= 3 and all(" *" in line for line in sums)
    assert (current / "SHA256SUMS.gpg").read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    assert (small_mirror.root / "releases" / "24.04" / "release" / "ubuntu-24.04-server-cloudimg-amd64.img").is_file()
    assert (small_mirror.root / "noble" / "20261127" / "SHA256SUMS").is_file()


def test_signature_verifies_with_real_gpgv(small_mirror):
    current = small_mirror.root / "noble" / "current"
    result = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", str(small_mirror.key.keyring),
                             str(current / "SHA256SUMS.gpg"), str(current / "SHA256SUMS")],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert f"VALIDSIG {small_mirror.key.fingerprint}" in result.stdout


def test_server_ranges_and_faults(server, small_mirror):
    url = server.url + "noble/current/noble-server-cloudimg-amd64.img"
    data = small_mirror.image.read_bytes()
    whole = requests.get(url, timeout=10)
    assert whole.status_code == 200 and whole.content == data
    part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:200]
    stale = requests.get(url, headers={"Range": "bytes=100-", "If-Range": '"other"'}, timeout=10)
    assert stale.status_code == 200 and len(stale.content) == len(data)
    server.fail("/noble/current/noble-server-cloudimg-amd64.img", Fault(status=500), Fault(flip_byte_at=5))
    assert requests.get(url, timeout=10).status_code == 500
    flipped = requests.get(url, timeout=10).content
    assert flipped[5] == data[5] ^ 0xFF and flipped[6:] == data[6:]
    assert [r.status for r in server.requests_for("amd64.img")] == [200, 206, 200, 500, 200]
    assert requests.get(server.url + "nope", timeout=10).status_code == 404
