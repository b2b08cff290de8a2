"""What the pipeline file knows of each distribution before anything is fetched: its releases, the
channels it publishes, its own mirror, the keys that sign its checksums, and what a bake of its
image should expect (the user its cloud-init creates, where its console is).

The layouts and the verification are the source modules' (``cloudbake.source.ubuntu``,
``debian``, ``fedora``); this table is what loading checks a pipeline against.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cloudbake.config.model import RELEASES, Distro


@dataclass(frozen=True)
class DistroFacts:
    """One distribution as the pipeline file sees it."""

    label: str                          # for messages: "Ubuntu"
    releases: dict[str, str]            # version -> codename (Fedora: number -> number)
    channel: str                        # a regular expression for its channels (besides `current`)
    channel_example: str
    mirror: str                         # its own mirror's root
    fingerprints: Mapping[str, tuple[str, ...]]   # release (or "*") -> keys that sign its checksums
    signed: bool                        # whether it signs its checksums at all
    default_user: str                   # the user its cloud-init config creates (cloudbake adds its own)
    console: str                        # its kernel's serial console, as the image configures it
    selinux: bool = False               # enforces SELinux: the bake restores the labels of what it wrote
    named_in_key: bool = True           # the key and lock name it (Ubuntu's predate distributions: they do not)


# What a key, lock or manifest that names no distribution was made for.
UNNAMED_DISTRO = Distro.ubuntu


UBUNTU_CLOUD_IMAGE_KEY = "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"

# Fedora signs each release with its own primary key (https://fedoraproject.org/security/);
# a CHECKSUM file verifies only against the key of its release.
FEDORA_KEYS = {
    "40": ("115DF9AEF857853EE8445D0A0727707EA15B79CC",),
    "41": ("466CF2D8B60BC3057AA9453ED0622462E99D6AD1",),
    "42": ("B0F4950458F69E1150C6C5EDC8AC4916105EF944",),
    "43": ("C6E7F081CF80E13146676E88829B606631645531",),
    "44": ("36F612DCF27F7D1A48A835E4DBFCF71C6D9F90A6",),
}

DISTROS = {
    Distro.ubuntu: DistroFacts(
        label="Ubuntu", releases=RELEASES,
        channel=r"release|[0-9]{8}(\.[0-9]+)?|release-[0-9]{8}(\.[0-9]+)?", channel_example="release-20240423",
        mirror="https://cloud-images.ubuntu.com/", fingerprints={"*": (UBUNTU_CLOUD_IMAGE_KEY,)}, signed=True,
        default_user="ubuntu", console="ttyS0 (amd64), ttyAMA0 (arm64)", named_in_key=False),
    Distro.debian: DistroFacts(
        label="Debian", releases={"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"},
        channel=r"[0-9]{8}-[0-9]{4}", channel_example="20250814-2204",
        mirror="https://cloud.debian.org/images/cloud/", fingerprints={}, signed=False,
        default_user="debian", console="ttyS0 (amd64), ttyAMA0 (arm64)"),
    Distro.fedora: DistroFacts(
        label="Fedora", releases={number: number for number in FEDORA_KEYS},
        channel=r"[0-9]+\.[0-9]+", channel_example="1.1",
        mirror="https://download.fedoraproject.org/pub/fedora/linux/", fingerprints=FEDORA_KEYS, signed=True,
        default_user="fedora", console="ttyS0 (amd64), ttyAMA0 (arm64)", selinux=True),
}


def facts(distro: Distro | str) -> DistroFacts:
    return DISTROS[Distro(distro)]


def known_release(distro: Distro | str, release: str) -> bool:
    releases = facts(distro).releases
    return release in releases or release in releases.values()


def codename_and_version(distro: Distro | str, release: str) -> tuple[str, str]:
    """(codename, version) of a known release named either way."""
    releases = facts(distro).releases
    if release in releases:
        return releases[release], release
    return release, next(version for version, codename in releases.items() if codename == release)


def known_channel(distro: Distro | str, channel: str) -> bool:
    return channel == "current" or re.fullmatch(facts(distro).channel, channel) is not None


def default_fingerprints(distro: Distro | str, release: str) -> tuple[str, ...]:
    """The keys a release's checksums must be signed by, when the pipeline names none."""
    table = facts(distro).fingerprints
    if "*" in table:
        return table["*"]
    version = codename_and_version(distro, release)[1] if known_release(distro, release) else release
    return table.get(version, ())
