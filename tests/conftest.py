"""Shared helpers. Slow fixtures (the cloud image, the mirror, a bake) live in tests/fixture/."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent

USER_DATA = """\
#cloud-config
packages: [curl]
runcmd:
  - echo hello
"""

pytest_plugins = ["tests.fixture.plugin", "tests.fixture.e2e"]


@pytest.fixture
def make_pipeline(tmp_path: Path) -> Callable[..., Path]:
    """Write a pipeline file (and a default user-data beside it) into a temp folder."""

    def make(text: str = "", *, user_data: str | None = USER_DATA, name: str = "pipeline.yaml") -> Path:
        (tmp_path / "cloud-init").mkdir(exist_ok=True)
        if user_data is not None:
            (tmp_path / "cloud-init" / "user-data.yaml").write_text(user_data)
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return make
