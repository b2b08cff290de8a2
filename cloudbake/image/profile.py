"""The bake's boot profile: which units and which cloud-init stages cost the guest's boot its time.

The finish script prints ``systemd-analyze blame`` and ``critical-chain`` behind a marker (both are
systemd's own C programs: no Python start under TCG); cloud-init's per-stage times come from the
status file the bake reads anyway. The bake records the profile in the manifest, prints the few
slowest units, and warns about the units known to stall a boot, with the fix (docs/debugging.md).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

PROFILE_MARKER = "CLOUDBAKE-PROFILE"
SLOWEST_SHOWN = 5
SLOWEST_KEPT = 15
# Units that wait for something outside the guest; over this many seconds they are what a user wants to know.
WAIT_BUDGET_S = 10.0
WAITING_UNITS = {
    "systemd-networkd-wait-online.service":
        "mask it (runcmd/bootcmd: systemctl mask systemd-networkd-wait-online.service) or give it "
        "--any/--interface in a drop-in: user networking has one interface",
    "NetworkManager-wait-online.service": "mask it, or set its timeout (nm-online -s -q --timeout=5) in a drop-in",
    "cloud-init-network.service": "cloud-init waits for the network: set network-config (a static or single "
                                  "DHCP interface), or mask systemd-networkd-wait-online.service it waits on",
    "cloud-init.service": "cloud-init waits for the network: set network-config (a static or single DHCP "
                          "interface), or mask systemd-networkd-wait-online.service it waits on",
    "systemd-time-wait-sync.service": "mask it: the guest's clock comes from the host",
    "apt-daily.service": "mask apt-daily.timer and apt-daily-upgrade.timer in the bake",
    "snapd.seeded.service": "the image seeds snaps at first boot; bake it (this is the bake) or remove snapd",
}
DOCS = "docs/debugging.md (Slow boots)"

# "1min 30.123s", "2.5s", "812ms", "1h 2min 3s" as systemd-analyze prints durations.
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|min|s|ms|us|µs)")
_SCALE = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_duration(text: str) -> float | None:
    parts = _PART.findall(text.replace(" ", ""))
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        return None
    return sum(float(number) * _SCALE[unit] for number, unit in parts)


@dataclass(frozen=True)
class BootProfile:
    slowest: tuple[tuple[str, float], ...]    # (unit, seconds), slowest first
    cloud_init: tuple[tuple[str, float], ...]  # (stage, seconds) in boot order
    critical_chain: str

    def as_manifest(self) -> dict[str, Any]:
        return {"slowest_units": [{"unit": unit, "seconds": round(s, 2)} for unit, s in self.slowest],
                "cloud_init_stages": {stage: round(s, 2) for stage, s in self.cloud_init},
                "critical_chain": self.critical_chain}

    def slow_waits(self) -> list[tuple[str, float, str]]:
        """(unit, seconds, the known fix) for every waiting unit over the budget."""
        return [(unit, seconds, WAITING_UNITS[unit]) for unit, seconds in self.slowest
                if unit in WAITING_UNITS and seconds > WAIT_BUDGET_S]

    def report(self, log: logging.Logger) -> None:
        if self.slowest:
            log.info("slowest units of the boot: %s", ", ".join(f"{unit} {seconds:.1f} s"
                                                                for unit, seconds in self.slowest[:SLOWEST_SHOWN]))
        if self.cloud_init:
            log.info("cloud-init stages: %s",
                     ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.cloud_init))
        for unit, seconds, fix in self.slow_waits():
            log.warning("%s took %.0f s of the boot (more than %.0f s): %s; every test VM that boots cold pays it "
                        "too (%s)", unit, seconds, WAIT_BUDGET_S, fix, DOCS)


def profile_script(nonce: str) -> str:
    """The finish script's line that prints the profile (one base64 word behind the marker)."""
    return (f'echo "{PROFILE_MARKER} {nonce} $( {{ systemd-analyze blame --no-pager 2>/dev/null '
            f'| head -n {SLOWEST_KEPT}; echo ---; systemd-analyze critical-chain --no-pager 2>/dev/null '
            '| head -n 40; } | base64 -w0)"')


def parse_boot_profile(printed: str | None, status: dict[str, Any] | None) -> BootProfile | None:
    """The profile from what this boot's finish script ``printed`` behind PROFILE_MARKER (decoded by the bake,
    which reads every marker the same way), and cloud-init's stage times from its status file; None when the
    guest printed none."""
    if printed is None:
        return None
    blame, _, chain = printed.partition("---\n")
    slowest = []
    for line in blame.splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        for split in range(len(words) - 1, 0, -1):   # the unit is the last word, the duration the rest
            seconds = parse_duration(" ".join(words[:split]))
            if seconds is not None:
                slowest.append((words[-1], seconds))
                break
    slowest.sort(key=lambda item: -item[1])
    stages = []
    for stage, info in ((status or {}).get("v1", {}) or {}).items():
        if isinstance(info, dict) and isinstance(info.get("start"), int | float) and \
                isinstance(info.get("finished"), int | float):
            stages.append((stage, float(info["finished"]) - float(info["start"])))
    return BootProfile(tuple(slowest[:SLOWEST_KEPT]), tuple(stages), chain.strip()[:4000])
