"""cloud_init.ca_certs: the host's extra CAs (or PEM files) reach the guest's trust store at bake time."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.image.cacerts import DISTRO_DEFAULTS, HOST_BUNDLE, host_extra_certificates, pem_certificates
from cloudbake.image.seed import build_seed_files


def _certificate(folder: Path, name: str) -> Path:
    path = folder / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(folder / f"{name}.key"), "-out", str(path), "-subj", f"/CN={name}", "-days", "2"],
                   check=True, capture_output=True)
    return path


def test_the_hosts_extra_certificates_are_those_its_distribution_does_not_ship(tmp_path):
    defaults = tmp_path / "usr-share" / "mozilla"
    defaults.mkdir(parents=True)
    shipped = [_certificate(defaults, "root-a"), _certificate(defaults, "root-b")]
    proxy = _certificate(tmp_path, "corp-proxy")
    bundle = tmp_path / "ca-certificates.crt"
    # The bundle as update-ca-certificates writes it: every trusted certificate, the added one among them.
    bundle.write_text(shipped[0].read_text() + proxy.read_text() + shipped[1].read_text())
    extra = host_extra_certificates(bundle, defaults.parent)
    assert extra == pem_certificates(proxy.read_text())


def test_this_hosts_own_bundle_is_read_as_is():
    """The real host path: whatever this machine trusts beyond its distribution (none on many)."""
    if not HOST_BUNDLE.is_file():
        pytest.skip("no Debian-style CA bundle on this host")
    known = {cert for file in DISTRO_DEFAULTS.rglob("*.crt") for cert in pem_certificates(file.read_text())}
    for cert in host_extra_certificates():
        assert cert.startswith("-----BEGIN CERTIFICATE-----\n") and cert not in known


def test_the_bake_seed_trusts_the_listed_certificates_and_keeps_the_users(make_pipeline, tmp_path):
    corp = _certificate(tmp_path, "corp")
    user_data = "#cloud-config\nca_certs:\n  remove_defaults: false\n  trusted: [MINE]\n"
    pipeline = load_pipeline(make_pipeline("name: t\ncloud_init: {ca_certs: [corp.crt]}\n", user_data=user_data))
    merged = yaml.safe_load(build_seed_files(pipeline).user_data)
    assert merged["ca_certs"]["remove_defaults"] is False
    assert merged["ca_certs"]["trusted"] == ["MINE", *pem_certificates(corp.read_text())]
    # Only the bake adds them: a test VM boots from an image that trusts them already.
    assert yaml.safe_load(build_seed_files(pipeline, for_bake=False).user_data)["ca_certs"]["trusted"] == ["MINE"]


@pytest.mark.parametrize(("files", "fragment"), [
    ("[nothing.pem]", "cannot read"),
    ("[notacert.pem]", "holds no PEM certificate"),
])
def test_certificate_files_that_are_not_are_refused(make_pipeline, tmp_path, files, fragment):
    (tmp_path / "notacert.pem").write_text("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n")
    pipeline = load_pipeline(make_pipeline(f"name: t\ncloud_init: {{ca_certs: {files}}}\n"))
    with pytest.raises(PipelineError, match=fragment):
        build_seed_files(pipeline)
