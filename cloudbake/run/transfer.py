"""Tar streams between the host and a guest: sent straight into SSH, received and extracted safely.

The guest runs the code under test, so what it sends back is hostile data. Extraction does
not lean on tarfile's ``data`` filter (Python before 3.11.13 / 3.12.11 / 3.13.4 lets a long
symlink chain past it, CVE-2025-4517): it takes only regular files and folders, refuses
links, devices, FIFOs and sparse members, checks each name itself, and creates every path
component below the destination with ``O_NOFOLLOW`` relative to an open folder, so nothing
the stream holds can name or reach a host path, on any Python.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.core.runner import Arg, drain, spawn, stop_process, tail
from cloudbake.core.units import human_bytes

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
COPY_CHUNK = 1 << 20


def host_key_changed() -> MachineryError:
    return MachineryError("ssh", "the test VM presented an SSH host key other than the one injected for this run; "
                                 "refusing to connect",
                          hint="something else answers on the forwarded port, or the guest's host key was "
                               "replaced (by the test command?)")



class _CappedReader:
    """A file-like view of a stream that refuses to read past ``limit`` bytes."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.limit, self.count = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise StreamTooLargeError()
        return data


class StreamTooLargeError(Exception):
    pass


# Linux's NAME_MAX, and room below PATH_MAX (4096) for the destination folder the member lands in.
NAME_MAX_BYTES = 255
MEMBER_PATH_MAX_BYTES = 2048


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member's name, checked: relative, no ``..``, not empty.

    ``./a//b/`` is ``("a", "b")``; ``/etc/passwd``, ``a/../../b``, ``.`` and ``""`` are refused.
    """
    if name.startswith("/") or "\0" in name:
        raise PipelineError(f"refusing {name[:200]!r} from the guest: an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if not parts:
        raise PipelineError(f"refusing {name[:200]!r} from the guest: it names no file")
    if ".." in parts:
        raise PipelineError(f"refusing {name[:200]!r} from the guest: it climbs out with '..'")
    # Names the host can hold whole, below the destination: every reader later (the JUnit summary, a
    # user's tools) opens the file by its full path, which the host refuses past PATH_MAX.
    if any(len(part.encode()) > NAME_MAX_BYTES for part in parts) or len(name.encode()) > MEMBER_PATH_MAX_BYTES:
        raise PipelineError(f"refusing {name[:200]!r}... from the guest: a path longer than this host names "
                            f"({MEMBER_PATH_MAX_BYTES} bytes, {NAME_MAX_BYTES} per part)")
    return parts


def _kind(member: tarfile.TarInfo) -> str | None:
    """'file' or 'dir', or None for anything else (links, devices, FIFOs, sparse files)."""
    if member.issparse():
        return None
    if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
        return "file"
    if member.type == tarfile.DIRTYPE:
        return "dir"
    return None


def _open_folder(root_fd: int, parts: Sequence[str]) -> int:
    """The folder ``parts`` below ``root_fd``, created as needed; a symlink on the way is refused (ELOOP)."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


class Extractor:
    """Extracts members of a guest's tar stream into one folder, counting what it writes."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.dest, self.max_bytes, self.written = dest, max_bytes, 0
        self.root_fd = os.open(dest, _DIR_FLAGS)

    def close(self) -> None:
        os.close(self.root_fd)

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def extract(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
        """Write ``member`` below the folder; returns its name as extracted (relative, checked)."""
        parts = member_parts(member.name)
        kind = _kind(member)
        name = "/".join(parts)
        if kind is None:
            what = ("a sparse file" if member.issparse() else "a symbolic link" if member.issym()
                    else "a hard link" if member.islnk() else "a device or FIFO")
            raise PipelineError(f"refusing {name[:200]!r} from the guest: {what}; only regular files and "
                                "folders are copied out")
        if kind == "dir":
            os.close(_open_folder(self.root_fd, parts))
            return name
        if self.written + member.size > self.max_bytes:
            raise StreamTooLargeError()
        folder = _open_folder(self.root_fd, parts[:-1])
        try:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                info = os.lstat(parts[-1], dir_fd=folder)
                if not stat.S_ISREG(info.st_mode):
                    raise PipelineError(f"refusing {name[:200]!r} from the guest: it would replace a "
                                        "folder or link already extracted")
            mode = 0o755 if member.mode & 0o100 else 0o644
            fd = os.open(parts[-1], _FILE_FLAGS, mode, dir_fd=folder)
        finally:
            os.close(folder)
        with os.fdopen(fd, "wb") as out:
            source = archive.extractfile(member)
            left = member.size
            while left and source is not None:
                chunk = source.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of the stream")
                out.write(chunk)
                left -= len(chunk)
        self.written += member.size
        return name


def extract_safely(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path,
                   max_bytes: int = 1 << 62) -> str:
    """One member below ``dest`` (see Extractor); returns its checked relative name."""
    with Extractor(dest, max_bytes) as extractor:
        return extractor.extract(archive, member)


@dataclass(frozen=True)
class Cap:
    """The most a stream from the guest may hold, the setting that says so, and how to allow more."""

    max_bytes: int
    setting: str          # e.g. test.artifacts_max
    hint: str


def receive_tar(argv: list[str], dest: Path, *, what: str, cap: Cap, timeout_s: float) -> list[str]:
    """Run ``argv`` (ssh writing a tar stream) and extract it safely into ``dest``.

    Bounded: at most ``cap.max_bytes`` of stream and of extracted sizes, and ``timeout_s``
    seconds; a stream that ends with tar or SSH failing is an error, never a partial
    success. Returns the names as extracted. Any OSError on the host side (a name too
    long, a full disk) is a PipelineError naming the member. Longer than most functions
    because it is the one place that turns every way a hostile or broken stream can end
    into an error.
    """
    max_bytes = cap.max_bytes
    with spawn(argv, stage="test-image", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as spawned:
        proc = spawned.proc
        assert proc.stdout is not None and proc.stderr is not None
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        names: list[str] = []
        stream = _CappedReader(proc.stdout, max_bytes)
        member_name = ""
        try:
            with Extractor(dest, max_bytes) as extractor, \
                    tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
                for member in archive:
                    member_name = member.name
                    names.append(extractor.extract(archive, member))
            stderr = proc.stderr.read().decode(errors="replace")
            proc.wait(30)
        except StreamTooLargeError:
            stop_process(proc, 1)
            raise PipelineError(f"{what}: larger than {cap.setting} ({human_bytes(max_bytes)}); "
                                f"{len(names)} file(s) copied into {dest} before stopping",
                                hint=cap.hint) from None
        except PipelineError:
            stop_process(proc, 1)
            raise
        except OSError as err:
            stop_process(proc, 1)
            raise PipelineError(f"{what}: cannot write {member_name[:200]!r} below {dest}: "
                                f"{err.strerror or err}", hint="free space on the host, or shorter names "
                                "in the guest") from None
        except tarfile.TarError as err:
            stop_process(proc, 1)
            stderr = proc.stderr.read().decode(errors="replace")
            if "Host key verification failed" in stderr:
                raise host_key_changed() from None
            if not timer.is_alive():
                raise PipelineError(f"{what}: did not finish within the time left ({timeout_s:.0f} s)",
                                    hint="raise test.timeout") from None
            raise PipelineError(f"{what}: the stream from the guest is broken ({err})",
                                hint=tail(stderr) or None) from None
        finally:
            timer.cancel()
    if proc.returncode == 255 and "Host key verification failed" in stderr:
        raise host_key_changed()
    if proc.returncode != 0:
        raise PipelineError(f"{what}: failed (exit status {proc.returncode}) after {len(names)} file(s):\n"
                            f"{tail(stderr)}", hint="a file that cannot be read, or the guest's tar; see above")
    return names


def send_tar(tar_argv: Sequence[Arg], ssh: list[str], *, cwd: Path, what: str, timeout_s: float) -> None:
    """Pipe a local ``tar -c`` straight into SSH: the bytes never touch the host's disk again."""
    with contextlib.ExitStack() as stack:
        tar = stack.enter_context(spawn(tar_argv, stage="test-image", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=cwd)).proc
        remote = stack.enter_context(spawn(ssh, stage="test-image", stdin=tar.stdout, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE)).proc
        assert tar.stdout is not None and tar.stderr is not None and remote.stderr is not None
        tar.stdout.close()  # SSH holds the pipe now; tar sees SIGPIPE if SSH dies
        # Both stderrs are read while waiting: tar's complaints (files gone since the listing, unreadable
        # ones) would otherwise fill its pipe, block it, and the run would wait out its whole timeout.
        tar_said, ssh_said = drain(tar.stderr), drain(remote.stderr)
        try:
            remote.wait(timeout_s)
            tar.wait(30)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"{what}: did not finish within {timeout_s:.0f} s") from None
        tar_err, ssh_err = tar_said(), ssh_said()
    if remote.returncode == 255 and "Host key verification failed" in ssh_err:
        raise host_key_changed()
    if remote.returncode != 0 or tar.returncode != 0:
        raise PipelineError(f"{what}: failed (guest side exit status {remote.returncode}, host tar "
                            f"{tar.returncode}):\n{tail(ssh_err + tar_err)}")
