"""Files in and out of a test VM: a host file or folder put into the guest, a guest path or the
artifacts' globs brought back, the project's selection uploaded; each one tar stream over SSH.

What comes back is extracted by ``transfer`` (only regular files and folders, names checked);
``get`` moreover refuses a stream that holds anything but the one path asked for.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.runner import Arg
from cloudbake.core.tools import require_tool
from cloudbake.run.ssh import remote_path
from cloudbake.run.transfer import Cap, receive_tar, send_tar

# The VM's SSH argv for a command run there (Machine.ssh_argv).
SshCommand = Callable[[str], list[str]]


def put_path(ssh: SshCommand, local: Path | str, remote: str, timeout_s: float) -> None:
    """Copy a host file or folder into the guest (``~`` is the run user's home).

    A folder's contents go into the folder ``remote`` (created, merged with what is there);
    a file becomes ``remote``, or goes inside it when ``remote`` is a folder.
    """
    local = Path(local)
    target = remote_path(remote)
    if local.is_dir():
        tar: list[Arg] = [require_tool("tar"), "-c", "-f", "-", "-C", local, "."]
        unpack = f"mkdir -p {target} && tar -x -f - -C {target} --no-same-owner --warning=no-timestamp"
    elif local.is_file():
        tar = [require_tool("tar"), "-c", "-f", "-", "-C", local.parent, local.name]
        name = shlex.quote(local.name)
        unpack = (f"set -e; t=$(mktemp -d); trap 'rm -rf \"$t\"' EXIT; tar -x -f - -C \"$t\" --no-same-owner "
                  f"--warning=no-timestamp; if [ -d {target} ]; then mv \"$t\"/{name} {target}/; "
                  f"else mkdir -p \"$(dirname {target})\" && mv \"$t\"/{name} {target}; fi")
    else:
        raise PipelineError(f"{local}: no such file or folder to copy into the guest")
    try:
        send_tar(tar, ssh(unpack), cwd=local.parent, what=f"copying {local} into the guest",
                 timeout_s=timeout_s)
    except PipelineError as err:
        raise MachineryError.from_error("put", err) from None


def get_path(ssh: SshCommand, remote: str, local: Path | str, *, max_bytes: int, timeout_s: float) -> Path:
    """Copy a guest file or folder to ``local`` on the host (read with sudo, extracted safely)."""
    local = Path(local)
    pack = (f"p={remote_path(remote)}; cd \"$(dirname \"$p\")\" && "
            f"sudo -n tar -c -f - -- \"$(basename \"$p\")\"")
    with tempfile.TemporaryDirectory(prefix=".cloudbake-get-", dir=local.parent if local.parent.is_dir()
                                     else None) as tmp:
        try:
            names = receive_tar(ssh(pack), Path(tmp), what=f"copying {remote} out of the guest",
                                cap=Cap(max_bytes, "max_bytes", "pass a larger max_bytes"), timeout_s=timeout_s)
        except PipelineError as err:
            raise MachineryError.from_error("get", err) from None
        if not names:
            raise MachineryError("get", f"{remote}: nothing to copy out of the guest")
        # The guest was asked for one file or folder: every member must lie under the
        # first one, a single plain name. Anything else is refused before the caller's
        # path is touched.
        top = names[0].split("/", 1)[0]
        if names[0] != top or any(name != top and not name.startswith(top + "/") for name in names):
            raise MachineryError("get", f"{remote}: the guest sent {names[0][:200]!r} and more than the one "
                                        "file or folder asked for; refused, nothing copied")
        local.parent.mkdir(parents=True, exist_ok=True)
        old = Path(tmp) / ".replaced"
        moved = local.is_dir() and not local.is_symlink()
        try:
            if moved:
                os.replace(local, old)    # moved aside, deleted with the temporary folder
            os.replace(Path(tmp) / top, local)
        except OSError as err:
            if moved and not local.exists():
                os.replace(old, local)
            raise MachineryError("get", f"cannot put {remote} at {local}: {err.strerror or err}") from None
    return local


def fetch_artifacts(ssh: SshCommand, patterns: Sequence[str], dest: Path, *, max_bytes: int,
                    timeout_s: float) -> list[str]:
    """Copy guest paths/globs into ``dest`` through one tar stream, bounded by test.artifacts_max."""
    if not patterns:
        return []
    remote = "sudo -n sh -c " + shlex.quote(ARTIFACTS_SCRIPT) + " sh " + " ".join(shlex.quote(p) for p in patterns)
    try:
        return receive_tar(ssh(remote), dest, what="copying the artifacts",
                           cap=Cap(max_bytes, "test.artifacts_max",
                                   "raise test.artifacts_max or narrow test.artifacts"), timeout_s=timeout_s)
    except PipelineError as err:
        raise MachineryError.from_error("artifacts", err) from None


def upload_tree(ssh: SshCommand, root: Path, names: Sequence[str], *, workdir: str, listing: Path,
                timeout_s: float) -> None:
    """Stream ``names`` (relative to ``root``) into ``test.workdir`` as one tar, owned by the run user."""
    listing.write_bytes(b"".join(os.fsencode(name) + b"\0" for name in names))
    # --no-recursion: the listing names every file itself (upload.py), cloudbake's own folders left out.
    tar: list[Arg] = [require_tool("tar"), "-c", "-f", "-", "--no-recursion", "--null", "-T", listing]
    unpack = (f"tar -x -f - -C {remote_path(workdir)} --no-same-owner "
              "--warning=no-timestamp")
    try:
        send_tar(tar, ssh(unpack), cwd=root, what="upload", timeout_s=timeout_s)
    except PipelineError as err:
        raise MachineryError.from_error("upload", err) from None
    finally:
        listing.unlink(missing_ok=True)


# Lists the matches of each pattern (NUL-separated, relative to /) and archives them all in
# one tar stream, however many there are: tar reads the list itself, so nothing is split
# into several archives the way xargs would. An empty IFS keeps spaces in patterns while
# globs still expand.
ARTIFACTS_SCRIPT = ("IFS=''; "
                    'cd / && for p in "$@"; do for f in $p; do [ -e "$f" ] && printf "%s\\0" "${f#/}"; done; done '
                    '| tar --null --files-from=- -cf -')
