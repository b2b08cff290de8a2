"""The bake's boot profile: parsed from what the guest printed, recorded, the known slow waits named."""

from __future__ import annotations

import base64
import logging

import pytest

from cloudbake.image.profile import PROFILE_MARKER, parse_boot_profile, parse_duration

NONCE = "n0nce"
BLAME = """\
1min 2.503s systemd-networkd-wait-online.service
     12.1s cloud-init-network.service
  1.201s cloud-final.service
    812ms ssh.service
     43us sys-kernel-config.mount
"""
CHAIN = "graphical.target @1min 20.1s\n└─multi-user.target @1min 20.0s\n"
STATUS = {"v1": {"init-local": {"start": 100.0, "finished": 101.5}, "init": {"start": 102.0, "finished": 164.25},
                 "stage": None, "datasource": "nocloud"}}


def _serial(nonce: str = NONCE, text: str = BLAME + "---\n" + CHAIN) -> str:
    return f"[ 1.0] boot\n{PROFILE_MARKER} {nonce} {base64.b64encode(text.encode()).decode()}\n"


def parse(serial: str, nonce: str, status):
    """As the bake reads it: this boot's marker decoded, then the profile."""
    from cloudbake.image.bake import _marker_text

    return parse_boot_profile(_marker_text(serial, PROFILE_MARKER, nonce), status)


@pytest.mark.parametrize(("text", "seconds"), [
    ("1min 2.503s", 62.503), ("12.1s", 12.1), ("812ms", 0.812), ("1h 2min 3s", 3723.0), ("43us", 43e-6),
    ("soon", None), ("12.1s foo", None),
])
def test_systemd_durations(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_the_profile_names_the_slowest_units_and_cloud_inits_stages(caplog):
    profile = parse(_serial(), NONCE, STATUS)
    assert profile is not None
    assert profile.slowest[0][0] == "systemd-networkd-wait-online.service"
    assert profile.slowest[0][1] == pytest.approx(62.503)
    assert [unit for unit, _ in profile.slowest][:3] == ["systemd-networkd-wait-online.service",
                                                        "cloud-init-network.service", "cloud-final.service"]
    assert dict(profile.cloud_init) == {"init-local": 1.5, "init": 62.25}
    assert "graphical.target" in profile.critical_chain
    recorded = profile.as_manifest()
    assert recorded["slowest_units"][1] == {"unit": "cloud-init-network.service", "seconds": 12.1}
    caplog.set_level(logging.INFO, logger="cloudbake")
    profile.report(logging.getLogger("cloudbake.bake"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2   # both waits are over the 10 s budget; ssh and the rest are not named
    assert warnings[0].startswith("systemd-networkd-wait-online.service took 63 s of the boot")
    assert "systemctl mask systemd-networkd-wait-online.service" in warnings[0] and "docs/debugging.md" in warnings[0]


def test_only_this_boots_profile_counts():
    assert parse(_serial("other"), NONCE, STATUS) is None
    quick = parse(_serial(text="2.0s ssh.service\n---\n"), NONCE, None)
    assert quick is not None and quick.slow_waits() == [] and quick.cloud_init == ()


def test_the_finish_script_prints_the_profile_before_generalizing():
    from cloudbake.image.seed import bake_finish_script

    script = bake_finish_script(generalize=True)
    assert script.index(PROFILE_MARKER) < script.index("cloud-init clean")
    assert "systemd-analyze blame --no-pager" in script
