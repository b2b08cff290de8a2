"""netlab's suite driven from the host by pytest, through cloudbake's pytest plugin.

    pytest vm_tests --cloudbake-pipeline pipeline.yaml

Each test gets its own throwaway VM (the ``cloudbake_vm`` fixture), with this repository
uploaded into ~/src: the two tests below both see a pristine host.
"""

from __future__ import annotations

SUITE = "sudo -En python3 tests/run.py --junit /var/tmp/netlab/junit.xml"


def test_suite_passes_in_a_fresh_vm(cloudbake_vm):
    result = cloudbake_vm.run(SUITE)
    assert result.status == 0, result.stdout + result.stderr
    assert "OK" in result.stderr or "OK" in result.stdout


def test_suite_passes_again_in_another_fresh_vm(cloudbake_vm):
    assert cloudbake_vm.run("ip -o link show netlab0").status != 0, "the bridge of the first test leaked"
    result = cloudbake_vm.run(SUITE)
    assert result.status == 0, result.stdout + result.stderr
