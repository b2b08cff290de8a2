"""netlab: what a function-as-a-service daemon (faasd) does to its host's networking, in miniature.

It creates a bridge for the function containers and a dummy uplink, routes the functions'
subnet, masquerades it with an nftables rule and turns on IP forwarding. Run as root: it
changes the host it runs on, which is why its tests run in a throwaway VM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

BRIDGE = "netlab0"
UPLINK = "netlab-up0"
SUBNET = "10.62.0.0/16"
GATEWAY = "10.62.0.1/16"
FORWARD_SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")
NFT_TABLE = "netlab"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-o", "link", "show").splitlines()}


def routes() -> str:
    return sh("ip", "route", "show")


def nft_tables() -> str:
    return sh("nft", "list", "tables")


def ip_forward() -> bool:
    return FORWARD_SYSCTL.read_text().strip() == "1"


def create_bridge() -> None:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", GATEWAY, "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")


def create_uplink() -> None:
    sh("ip", "link", "add", UPLINK, "type", "dummy")
    sh("ip", "link", "set", UPLINK, "up")


def route_functions() -> None:
    sh("ip", "route", "replace", "10.63.0.0/16", "dev", UPLINK)


def masquerade() -> None:
    sh("nft", "add", "table", "ip", NFT_TABLE)
    sh("nft", "add", "chain", "ip", NFT_TABLE, "postrouting", "{ type nat hook postrouting priority 100 ; }")
    sh("nft", "add", "rule", "ip", NFT_TABLE, "postrouting", "ip", "saddr", SUBNET, "masquerade")


def enable_forwarding() -> None:
    FORWARD_SYSCTL.write_text("1\n")


def set_up_host() -> None:
    """All of it, in the order faasd does it."""
    create_bridge()
    create_uplink()
    route_functions()
    masquerade()
    enable_forwarding()
