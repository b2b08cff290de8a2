"""CA certificates for the guest's trust store (``cloud_init.ca_certs``): PEM files, or the ones this host
trusts beyond its distribution's defaults, handed to cloud-init's ``ca_certs`` module at bake time.

Behind a TLS-intercepting proxy or with a company CA, a guest's package installs fail with
``CERTIFICATE_VERIFY_FAILED`` unless it trusts what the host trusts.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cloudbake.config.model import Pipeline
from cloudbake.core.errors import PipelineError

HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DISTRO_DEFAULTS = Path("/usr/share/ca-certificates")
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s+([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")


def pem_certificates(text: str) -> list[str]:
    """Every certificate in ``text`` as one normalized PEM block (the DER checked to be base64)."""
    found = []
    for body in _PEM.findall(text):
        der = base64.b64decode("".join(body.split()), validate=True)
        lines = [base64.b64encode(der).decode()[i:i + 64] for i in range(0, len(base64.b64encode(der)), 64)]
        found.append("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n")
    return found


def host_extra_certificates(bundle: Path = HOST_BUNDLE, defaults: Path = DISTRO_DEFAULTS) -> list[str]:
    """The certificates of the host's bundle that its distribution's default set does not hold: the ones an
    administrator added (``/usr/local/share/ca-certificates``, a proxy's CA)."""
    try:
        trusted = pem_certificates(bundle.read_text(errors="replace"))
    except OSError as err:
        raise PipelineError(f"cloud_init.ca_certs: host: cannot read this host's CA bundle {bundle} "
                            f"({err.strerror or err})",
                            hint="list the PEM files instead (cloud_init.ca_certs: [corp-ca.pem])") from None
    known = {cert for file in sorted(defaults.rglob("*.crt")) if file.is_file()
             for cert in pem_certificates(file.read_text(errors="replace"))} if defaults.is_dir() else set()
    return [cert for cert in dict.fromkeys(trusted) if cert not in known]


def certificates_for(pipeline: Pipeline) -> list[str]:
    """The PEM certificates ``cloud_init.ca_certs`` asks the guest to trust (none by default)."""
    wanted = pipeline.cloud_init.ca_certs
    if wanted == "host":
        return host_extra_certificates()
    certificates: list[str] = []
    for file in wanted:
        try:
            found = pem_certificates(Path(file).read_text(errors="replace"))
        except OSError as err:
            raise PipelineError(f"cloud_init.ca_certs: cannot read {file} ({err.strerror or err})") from None
        except ValueError:
            found = []
        if not found:
            raise PipelineError(f"cloud_init.ca_certs: {file} holds no PEM certificate",
                                hint="a file with -----BEGIN CERTIFICATE----- blocks")
        certificates += found
    return list(dict.fromkeys(certificates))
