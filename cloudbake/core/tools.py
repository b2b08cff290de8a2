"""The host programs cloudbake runs, each with the packages that bring it: the one table that install
hints, ``validate`` and the checks before a boot read.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from cloudbake.core.errors import MachineryError, PipelineError


@dataclass(frozen=True)
class Tool:
    name: str
    apt: str      # Debian and Ubuntu package
    brew: str     # Homebrew formula ("" when macOS has it already)

    def install_line(self) -> str:
        apt = f"apt-get install {self.apt}"
        return f"{apt}; macOS: brew install {self.brew}" if self.brew else f"{apt} (macOS has it)"


TOOLS = {tool.name: tool for tool in (
    Tool("qemu-img", "qemu-utils", "qemu"),
    Tool("qemu-system-x86_64", "qemu-system-x86", "qemu"),
    Tool("qemu-system-aarch64", "qemu-system-arm", "qemu"),
    Tool("gpgv", "gpgv", "gnupg"),
    Tool("zstd", "zstd", "zstd"),
    Tool("ssh", "openssh-client", ""),
    Tool("ssh-keygen", "openssh-client", ""),
    Tool("git", "git", "git"),
    Tool("tar", "tar", ""),
)}
# What apt-get line installs every program a test run may need (docs/own-repository.md shows it).
RUN_PACKAGES = ("openssh-client", "zstd", "git", "tar")


def run_tools(*, warm: bool, git: bool = False) -> list[str]:
    """The host programs a test VM needs, checked before anything boots: ssh and ssh-keygen (the run's
    keys, every command), tar (files in and out), zstd when it resumes or saves warm sets (without it a
    restored set is useless and every run boots cold), git when the project is uploaded from its work tree."""
    return ["ssh", "ssh-keygen", "tar", *(["zstd"] if warm else []), *(["git"] if git else [])]


def install_hint(name: str) -> str:
    tool = TOOLS.get(name)
    return f"install it: {tool.install_line()}" if tool else f"install {name}"


class ToolMissingError(PipelineError):
    """A host program is not on PATH; ``tool`` names it, so what failed for its lack can be retried once it is there."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"'{tool}' not found on PATH", hint=install_hint(tool))
        self.tool = tool


def require_tool(name: str, path: str | None = None) -> str:
    """Absolute path of ``name`` on PATH (or ``path``), or an error that says how to install it."""
    found = shutil.which(name, path=path)
    if found is None:
        raise ToolMissingError(name)
    return found


def missing_tools(names: list[str]) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def check_host_tools(names: list[str], *, stage: str) -> None:
    """Before anything boots: every program in ``names`` is on PATH, else MachineryError (exit 125)
    naming each missing one and its install line."""
    missing = missing_tools(names)
    if missing:
        lines = "; ".join(f"{name} ({install_hint(name)})" for name in missing)
        raise MachineryError(stage, f"missing on this host: {lines}",
                             hint="nothing was booted and no warm set was touched; install them and run again")
