"""The package a release publishes: ``python -m build``'s sdist and wheel each install into a fresh venv
(from the built files, no checkout on the path) and work: the command, validate, the API's errors, the
pytest plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import cloudbake
from tests.fixture.offline import offline_project
from tests.fixture.plugin import BuiltPackage


def _venv_with(package: Path, built: BuiltPackage, folder: Path) -> Path:
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
                                "--find-links", str(built.wheelhouse), str(package)],
                               capture_output=True, text=True, cwd=folder)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv / "bin"


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_the_built_package_installs_and_works_from_a_fresh_venv(built_package, tmp_path, kind):
    package = built_package.wheel if kind == "wheel" else built_package.sdist
    bin_dir = _venv_with(package, built_package, tmp_path)
    project = tmp_path / "project"   # a user's repository: pipeline.yaml and cloud-init/ only
    project.mkdir()
    offline_project(project)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=300)

    version = run(str(bin_dir / "cloudbake"), "--version")
    assert version.returncode == 0 and version.stdout.startswith(f"cloudbake {cloudbake.__version__} "), version
    validated = run(str(bin_dir / "cloudbake"), "validate")
    assert "ok  user-data" in validated.stdout and "ok  pipeline" in validated.stdout, validated.stdout
    api = run(str(bin_dir / "python"), "-c",
              "import cloudbake, pathlib, importlib.resources as r; "
              "assert issubclass(cloudbake.MachineryError, cloudbake.PipelineError); "
              "assert cloudbake.CommandFailedError.__name__ == 'CommandFailedError'; "
              "assert r.files('cloudbake').joinpath('py.typed').is_file(); "
              "print(pathlib.Path(cloudbake.__file__).parent)")
    assert api.returncode == 0, api.stderr
    assert str(tmp_path / "venv") in api.stdout   # the installed package, not this checkout
    (project / "test_vm.py").write_text("def test_vm(cloudbake_vm):\n    pass\n")
    plugin = run(str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                 str(built_package.wheelhouse), "pytest")   # not a runtime dependency: the user's own
    assert plugin.returncode == 0, plugin.stderr
    fixtures = run(str(bin_dir / "python"), "-m", "pytest", "--fixtures", "-p", "no:cacheprovider", "test_vm.py")
    assert "cloudbake_vm_session" in fixtures.stdout and "--cloudbake-image" in run(
        str(bin_dir / "python"), "-m", "pytest", "--help").stdout


def test_the_sdist_carries_what_a_wheel_built_from_it_needs(built_package):
    import tarfile

    with tarfile.open(built_package.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("LICENSE", "docs/package-readme.md", "schema/pipeline.schema.json",
                   "schema/cloud-init/schema-cloud-config-v1.json", "schema/cloud-init/COPYRIGHT", "tasks/run.sh",
                   "cloudbake/py.typed", "pyproject.toml"):
        assert needed in names, needed
