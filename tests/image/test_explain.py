"""docs/guide.md's walk-throughs come from the code: every QEMU argument cloudbake builds is explained."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from cloudbake.config.model import Arch
from cloudbake.image.explain import example_specs, explain_argv, fill_generated, parse_sudoers_rule, render_argv_table
from cloudbake.image.seed import SUDO_NOPASSWD
from cloudbake.qemu.argv import VmSpec, build_qemu_argv
from tests.conftest import PROJECT

GUIDE = PROJECT / "docs" / "guide.md"


def test_the_guide_is_rendered_from_the_code() -> None:
    text = GUIDE.read_text()
    assert text == fill_generated(text), "run: doit docs"
    assert "qemu-system-aarch64" in text and "`-accel hvf`" in text and "`-machine virt,highmem=on`" in text
    assert "ubuntu ALL=(ALL) NOPASSWD:ALL" in text


def every_spec() -> list[VmSpec]:
    base = example_specs()["linux"][0]
    specs = []
    for arch, accel, firmware, interactive, incoming, seed in itertools.product(
            Arch, ("tcg", "kvm", "hvf"), ("uefi", "bios"), (False, True), (None, "exec:cat state"),
            (None, Path("seed.iso"))):
        specs.append(replace(base, arch=arch, accel=accel, firmware=firmware, interactive=interactive,
                             incoming=incoming, seed=seed, ssh_port=2222, forwards=((8080, 80),)))
    return specs


@pytest.mark.parametrize("spec", every_spec(), ids=lambda s: f"{s.arch}-{s.accel}-{s.firmware}-"
                                                          f"{int(s.interactive)}{int(bool(s.incoming))}"
                                                          f"{int(bool(s.seed))}")
def test_every_argument_cloudbake_builds_is_explained(spec: VmSpec) -> None:
    argv = build_qemu_argv(spec, "qemu")
    explained = explain_argv(argv)      # KeyError: an option the guide does not explain
    assert sum(1 + bool(a.value) for a in explained) == len(argv) - 1
    assert all(a.why for a in explained)
    table = render_argv_table(spec, "qemu")
    assert table.count("\n| `-") == len(explained)


def test_an_unexplained_option_is_caught() -> None:
    with pytest.raises(KeyError):
        explain_argv(["qemu", "-some-new-option", "value"])


@pytest.mark.parametrize("spec, parts", [
    ("ALL=(ALL) NOPASSWD:ALL", ("ALL", "ALL", "NOPASSWD:", "ALL")),
    ("ALL=(root) /usr/sbin/poweroff", ("ALL", "root", "", "/usr/sbin/poweroff")),
    ("web1=(ALL:ALL) NOPASSWD:SETENV:ALL", ("web1", "ALL:ALL", "NOPASSWD:SETENV:", "ALL")),
])
def test_a_sudoers_rule_is_taken_apart_as_sudoers_5_reads_it(spec: str, parts: tuple[str, ...]) -> None:
    rule = parse_sudoers_rule("ubuntu", spec)
    assert (rule.hosts, rule.runas, rule.tags, rule.commands) == parts


def test_the_seed_gives_its_user_that_rule(tmp_path: Path) -> None:
    from cloudbake.config.pipeline import load_pipeline
    from cloudbake.image.seed import merge_user_data
    from tests.fixture.offline import offline_project

    pipeline = load_pipeline(offline_project(tmp_path))
    merged = merge_user_data({}, pipeline, [], for_bake=True)
    entry = next(u for u in merged["users"] if isinstance(u, dict) and u["name"] == pipeline.cloud_init.user)
    assert entry["sudo"] == SUDO_NOPASSWD and entry["lock_passwd"] is True
