"""netlab's suite. Every test first asserts the host is pristine, then changes it: the suite
passes only on a fresh machine, every time, which a throwaway VM per run gives it."""

from __future__ import annotations

import os
import unittest

import netlab


class PristineHost(unittest.TestCase):
    def test_no_bridge_no_uplink(self):
        self.assertNotIn(netlab.BRIDGE, netlab.links())
        self.assertNotIn(netlab.UPLINK, netlab.links())

    def test_no_function_routes(self):
        self.assertNotIn("10.62.", netlab.routes())
        self.assertNotIn("10.63.", netlab.routes())

    def test_no_netlab_firewall_table(self):
        self.assertNotIn(netlab.NFT_TABLE, netlab.nft_tables())

    def test_forwarding_off(self):
        self.assertFalse(netlab.ip_forward())


class SetUpHost(unittest.TestCase):
    """Runs after PristineHost (unittest orders classes by name in the module: P < S)."""

    @classmethod
    def setUpClass(cls):
        assert netlab.BRIDGE not in netlab.links(), "the host is not pristine: an earlier run left its bridge"
        netlab.set_up_host()

    def test_bridge_is_up_with_the_gateway(self):
        self.assertIn(netlab.BRIDGE, netlab.links())
        self.assertIn("10.62.0.1/16", netlab.sh("ip", "-o", "addr", "show", "dev", netlab.BRIDGE))

    def test_functions_are_routed_over_the_uplink(self):
        self.assertIn(f"10.63.0.0/16 dev {netlab.UPLINK}", netlab.routes())

    def test_functions_are_masqueraded(self):
        self.assertIn("masquerade", netlab.sh("nft", "list", "table", "ip", netlab.NFT_TABLE))

    def test_forwarding_on(self):
        self.assertTrue(netlab.ip_forward())

    def test_deliberate_failure_when_asked(self):
        # NETLAB_FAIL=1 shows what a failing suite looks like from cloudbake's side.
        self.assertNotEqual(os.environ.get("NETLAB_FAIL"), "1", "NETLAB_FAIL=1 asked this test to fail")
