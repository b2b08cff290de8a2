"""pytest plugin: throwaway VMs of a pipeline's baked image as fixtures.

    def test_bridge(cloudbake_vm):                 # a fresh VM for this test
        cloudbake_vm.run("sudo ip link add br0 type bridge", check=True)

    def test_api(cloudbake_vm_session):            # one VM for the whole session (per xdist worker)
        assert cloudbake_vm_session.run("systemctl is-active ssh").ok

Options: ``--cloudbake-pipeline PATH`` (default: $CLOUDBAKE_PIPELINE, else pipeline.yaml in
pytest's root folder), ``--cloudbake-image NAME`` (default $CLOUDBAKE_IMAGE: one image of a file
that describes several, ``matrix:`` or ``images:``; a test picks its own with
``@pytest.mark.cloudbake_image("NAME")``) and ``--cloudbake-logs DIR`` (default .cloudbake-logs in
the root folder): when a test using a VM fails, the VM's serial log and test.artifacts are kept in
``DIR/<test id>/``. Installed with cloudbake (entry point ``pytest11``); the fixtures only
boot when a test asks for them. Under pytest-xdist every worker starts its own VMs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

LOGS_DEFAULT = ".cloudbake-logs"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cloudbake", "throwaway VMs of a baked cloudbake image")
    group.addoption("--cloudbake-pipeline", default=None,
                    help="the pipeline file (default: $CLOUDBAKE_PIPELINE, else pipeline.yaml in the root folder)")
    group.addoption("--cloudbake-image", default=None,
                    help="one image of a pipeline file that describes several (default: $CLOUDBAKE_IMAGE)")
    group.addoption("--cloudbake-logs", default=None,
                    help=f"where failing tests keep their VM's serial log and artifacts (default {LOGS_DEFAULT})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cloudbake_image(name): the image of a many-image pipeline file that this "
                                       "test's cloudbake_vm boots")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item.stash.setdefault(_FAILED, set()).add(report.when)
        if "cloudbake_vm_session" in getattr(item, "fixturenames", ()):
            item.session.stash[_SESSION_VM_FAILED] = True


_FAILED = pytest.StashKey[set]()  # type: ignore[type-arg]
_SESSION_VM_FAILED = pytest.StashKey[bool]()


def _pipeline_file(config: pytest.Config) -> Path:
    given = config.getoption("cloudbake_pipeline") or os.environ.get("CLOUDBAKE_PIPELINE")
    return Path(given) if given else Path(config.rootpath) / "pipeline.yaml"


def _logs_dir(config: pytest.Config) -> Path:
    given = config.getoption("cloudbake_logs")
    return Path(given) if given else Path(config.rootpath) / LOGS_DEFAULT


def _worker_label(config: pytest.Config) -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "pytest")


def _keep_evidence(machine: Any, folder: Path) -> None:
    """The serial log and test.artifacts of a VM whose test failed, before the VM is thrown away."""
    folder.mkdir(parents=True, exist_ok=True)
    if machine.files is not None and machine.serial_log.exists():
        shutil.copyfile(machine.serial_log, folder / "serial.log")
    try:
        machine.fetch_artifacts(machine.pipeline.test.artifacts, folder / "artifacts")
    except Exception as err:  # evidence is best effort: the VM may be what broke
        (folder / "artifacts-error.txt").write_text(f"{err}\n")


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:200] or "test"


def _image(config: pytest.Config, node: pytest.Item | None = None) -> str | None:
    marker = node.get_closest_marker("cloudbake_image") if node is not None else None
    if marker is not None and marker.args:
        return str(marker.args[0])
    return config.getoption("cloudbake_image") or os.environ.get("CLOUDBAKE_IMAGE") or None


def _machine(config: pytest.Config, node: pytest.Item | None = None) -> Any:
    from cloudbake.api import vm

    return vm(_pipeline_file(config), label=f"pytest-{_worker_label(config)}", image=_image(config, node))


@pytest.fixture
def cloudbake_vm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh throwaway VM of the baked image for this test (test.upload sent), gone afterwards."""
    with _machine(request.config, request.node) as machine:
        yield machine
        if request.node.stash.get(_FAILED, set()) & {"setup", "call"}:
            folder = _logs_dir(request.config) / _safe_name(request.node.nodeid)
            _keep_evidence(machine, folder)
            request.node.add_report_section("teardown", "cloudbake", f"serial log and artifacts kept in {folder}")


@pytest.fixture(scope="session")
def cloudbake_vm_session(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One throwaway VM for the whole session (one per pytest-xdist worker), gone afterwards."""
    with _machine(request.config) as machine:
        yield machine
        if request.session.stash.get(_SESSION_VM_FAILED, False):
            folder = _logs_dir(request.config) / f"session-{_worker_label(request.config)}"
            _keep_evidence(machine, folder)
