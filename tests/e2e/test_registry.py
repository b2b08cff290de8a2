"""The real shared bake through a real registry: pushed from the baker's checkout, pulled by a fresh one
that then resumes warm (no guest boots on the fresh machine)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fixture.published import image_sha, with_remote
from tests.fixture.registry import Registry as RegistryServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


def test_the_shared_bake_pushed_is_pulled_by_a_fresh_checkout(baked, real_server, registry, tmp_path: Path) -> None:
    """The real baked image and its warm set through the installed `cloudbake`: push from the baker's
    checkout; a fresh checkout (lock, no dist/, no download cache) bakes by pulling both (no upstream
    request, no QEMU), and its first test run resumes warm: no guest boots on the fresh machine."""
    from tests.fixture.e2e import cloudbake

    remote = f"oci://{registry.address}/cb/e2e"
    checkouts = {}
    for name in ("baker", "fresh"):
        folder = tmp_path / name
        shutil.copytree(baked["folder"] / "cloud-init", folder / "cloud-init")
        shutil.copy(baked["folder"] / "pipeline.lock", folder / "pipeline.lock")
        text = baked["pipeline"].read_text().replace(str(baked["folder"] / "cache"), str(folder / "cache"))
        # TCG on both sides, as the shared bake fell back to here: the fresh checkout has no KVM
        # verdict yet and would otherwise look for a KVM set (the accelerator is not in the image key).
        text = text.replace("accel: auto", "accel: tcg")
        (folder / "pipeline.yaml").write_text(text)
        with_remote(folder / "pipeline.yaml", remote)
        checkouts[name] = folder
    shutil.copytree(baked["folder"] / "dist", checkouts["baker"] / "dist", symlinks=True,
                    ignore=shutil.ignore_patterns(".runs"))
    warmed = cloudbake(baked["cloudbake"], "warm", cwd=checkouts["baker"], timeout=900)
    assert warmed.returncode == 0, warmed.stdout + warmed.stderr
    pushed = cloudbake(baked["cloudbake"], "push", cwd=checkouts["baker"], timeout=600)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "pushed the warm set" in pushed.stderr
    before = len(real_server.state.requests)
    pulled = cloudbake(baked["cloudbake"], "bake", cwd=checkouts["fresh"], timeout=600)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "pulled" in pulled.stderr and "starting qemu" not in pulled.stderr
    assert len(real_server.state.requests) == before
    assert not (checkouts["fresh"] / "cache" / "images").exists()
    assert image_sha(checkouts["fresh"] / "dist" / baked["image"].name) == image_sha(baked["image"])
    assert "pulled the warm set" in pulled.stderr
    tested = cloudbake(baked["cloudbake"], "test-image", "--no-bake", cwd=checkouts["fresh"], timeout=900)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "resumed warm" in tested.stderr and "booting it once" not in tested.stderr
    assert tested.stderr.count("starting qemu") == 1
