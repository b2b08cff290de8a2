"""HTTP for cloudbake: one session, one retry loop, bounded small fetches, and resumable verified downloads.

A download hashes while the bytes arrive (on a second thread), resumes a `.part` file with
`If-Range`, never grows past the size it was told to expect, cuts off a server that trickles
bytes, and renames the file into place only when the SHA-256 matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from cloudbake import __version__
from cloudbake.errors import PipelineError
from cloudbake.files import file_lock, is_verified, record_verified, write_atomically
from cloudbake.log import stage_logger
from cloudbake.units import human_bytes

log = stage_logger("fetch")
T = TypeVar("T")


CHUNK_BYTES = 1 << 20


# Without a pinned size (the first fetch), a download larger than this is refused: Ubuntu's
# cloud images are well under 1 GiB; a server that never stops sending is not an image.
UNPINNED_MAX_BYTES = 16 << 30


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts and retries; tests shorten them."""

    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0
    attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    # A server that sends a byte now and then never trips the read timeout: an attempt that
    # averages less than this over a whole window is cut off (and retried, then resumed).
    min_rate_bytes_s: float = 16 << 10
    rate_window_s: float = 60.0


class _Session(requests.Session):
    """A session whose own ``verify`` (a CA file, for a registry's private CA) is kept.

    requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override a session's ``verify`` for
    every request that does not pass one; CI images often set those variables.
    """

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


def make_session(verify: bool | str = True) -> requests.Session:
    session = _Session()
    session.verify = verify
    session.headers["User-Agent"] = f"cloudbake/{__version__}"
    return session


def _is_retryable(err: Exception) -> bool:
    return isinstance(err, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))


def _describe(err: Exception, url: str, http: HttpSettings) -> str:
    if isinstance(err, requests.ReadTimeout) or (isinstance(err, requests.ConnectionError)
                                                  and "Read timed out" in str(err)):
        return f"no data from {url} for {http.read_timeout_s:g} s (read timeout)"
    if isinstance(err, requests.ConnectTimeout):
        return f"could not connect to {url} within {http.connect_timeout_s:g} s (connect timeout)"
    if isinstance(err, requests.ConnectionError):
        return f"connection to {url} failed: {err}"
    return f"download of {url} failed: {err}"


def _backoff(attempt: int, http: HttpSettings) -> None:
    time.sleep(min(http.backoff_s * (2 ** attempt), http.backoff_max_s))


def _check_status(response: requests.Response, url: str) -> None:
    if response.status_code == 404:
        raise PipelineError(f"not found (404): {url}",
                            hint="check source.release, source.arch, source.channel and source.mirror")
    if response.status_code >= 400 and response.status_code < 500:
        raise PipelineError(f"{url} answered {response.status_code} {response.reason}")


def fetch_small(session: requests.Session, url: str, max_bytes: int, http: HttpSettings) -> bytes:
    """A small file (checksums, signature, key) with retries; refuses more than ``max_bytes``."""
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise PipelineError(f"not found: {url}", hint="check source.mirror and source.release") from None
        if len(data) > max_bytes:
            raise PipelineError(f"{url} is larger than {human_bytes(max_bytes)}; refusing it")
        return data
    def attempt() -> bytes:
        with session.get(url, stream=True, timeout=(http.connect_timeout_s, http.read_timeout_s)) as response:
            _check_status(response, url)
            if response.status_code >= 500:
                raise ServerError(f"{url} answered {response.status_code} {response.reason}")
            data = read_body(response, max_bytes, url, http)
            if len(data) > max_bytes:
                raise PipelineError(f"{url} is larger than {human_bytes(max_bytes)}; refusing it")
            return data

    return with_retries(attempt, url, http)


def with_retries(attempt: Callable[[], T], url: str, http: HttpSettings,
                 gave_up_detail: Callable[[], str] = lambda: "") -> T:
    """The one retry loop: ``attempt()`` again after a dropped connection, a timeout or a 5xx, with backoff.

    Anything else (a 404, a refused size, a bad header) ends at once. After the last attempt
    the error says what happened and how often it was tried (plus ``gave_up_detail()``).
    """
    last = ""
    for number in range(http.attempts):
        try:
            return attempt()
        except requests.RequestException as err:
            if not _is_retryable(err):
                raise PipelineError(_describe(err, url, http)) from None
            last = _describe(err, url, http)
        except ServerError as err:
            last = str(err)
        if number + 1 < http.attempts:
            log.info("%s; retrying (%d/%d)", last, number + 2, http.attempts)
            _backoff(number, http)
    raise PipelineError(f"{last} (gave up after {http.attempts} attempts{gave_up_detail()})",
                        hint="check the network and the mirror")


class Progress:
    """A progress bar on a terminal; otherwise a log line every 10 % or 30 s."""

    def __init__(self, name: str, total: int | None, start: int, stage: str = "fetch") -> None:
        self.name, self.total, self.done = name, total, start
        self.log = stage_logger(stage)
        self.lock = threading.Lock()
        self.bar: Any = None
        self.next_percent, self.last_log = 10, time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f"[{stage}] {name}", leave=False, dynamic_ncols=True)

    def update(self, count: int) -> None:
        with self.lock:   # transfers of several parts report into one line
            self._update(count)

    def _update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        percent = int(self.done * 100 / self.total) if self.total else 0
        if percent >= self.next_percent or now - self.last_log >= 30:
            self.log.info("%s: %s%s", self.name, human_bytes(self.done),
                     f" of {human_bytes(self.total)} ({percent} %)" if self.total else "")
            self.next_percent = (percent // 10 + 1) * 10
            self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hash_existing(path: Path) -> tuple[Any, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest, size


def download(session: requests.Session, url: str, dest: Path, sha256: str, http: HttpSettings,
             expected_size: int | None = None) -> Path:
    """Download ``url`` to ``dest``, resuming a ``.part`` file, hashing while the bytes arrive.

    ``dest`` appears only when the digest matches; a mismatch deletes the partial.
    Concurrent calls for the same ``dest`` serialize on a lock; the second one then
    finds the verified file and returns at once.
    """
    with file_lock(dest.with_name(dest.name + ".lock"), dest.name):
        if is_verified(dest, sha256):
            log.info("cached: %s (verified sha256 %s…)", dest, sha256[:12])
            return dest
        if url.startswith("file://"):
            _copy_local(url, dest, sha256)
            return dest
        part = dest.with_name(dest.name + ".part")
        validator_file = dest.with_name(dest.name + ".part.json")
        def kept() -> str:
            size = part.stat().st_size if part.exists() else 0
            return f"; {human_bytes(size)} kept in {part} for the next run to resume"

        try:
            with_retries(lambda: _download_attempt(session, url, part, validator_file, http, expected_size), url,
                         http, gave_up_detail=kept)
        except _TooLargeError as err:
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            _running.pop(part, None)
            raise PipelineError(str(err), hint="check source.mirror; run doit update if the image really "
                                               "changed") from None
        digest, _ = _hash_existing_cached(part)
        actual = digest.hexdigest()
        if actual != sha256:
            _running.pop(part, None)
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            raise PipelineError(f"{url}: SHA-256 mismatch: expected {sha256}, got {actual}; the download was deleted",
                                hint="run again; if it persists the mirror serves a corrupted or tampered file")
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        _running.pop(part, None)
        validator_file.unlink(missing_ok=True)
        record_verified(dest, sha256)
        log.info("verified %s (sha256 %s…)", dest.name, sha256[:12])
        return dest


class ServerError(Exception):
    """A 5xx, a 429 or a cut-off: worth another attempt (the retry loop's kind of error)."""


# The running digest of the partial file, kept between attempts so a resume hashes only new bytes.
_running: dict[Path, tuple[Any, int]] = {}


def _hash_existing_cached(part: Path) -> tuple[Any, int]:
    size = part.stat().st_size if part.exists() else 0
    cached = _running.get(part)
    if cached is not None and cached[1] == size:
        return cached
    _running[part] = _hash_existing(part) if part.exists() else (hashlib.sha256(), 0)
    return _running[part]


class BackgroundHasher:
    """Feeds a digest on a second thread, so hashing overlaps with receiving and writing.

    hashlib releases the GIL for large buffers; one extra thread takes the SHA-256 off
    the download's critical path. ``finish()`` waits until every chunk is hashed.
    """

    def __init__(self, digest: Any, depth: int = 16) -> None:
        import queue
        import threading

        self.digest = digest
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="cloudbake-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()


def body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives; unlike iter_content, bytes received before a drop are not lost in a buffer."""
    import urllib3

    raw = response.raw
    try:
        while chunk := raw.read1(CHUNK_BYTES):
            yield chunk
    except urllib3.exceptions.ReadTimeoutError as err:
        raise requests.ReadTimeout(str(err)) from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead, OSError) as err:
        raise requests.exceptions.ChunkedEncodingError(str(err)) from None


class RateFloor:
    """Cuts off a body that averages less than ``min_rate_bytes_s`` over a whole window.

    A server that sends a byte now and then never trips the read timeout; every body cloudbake
    reads (images, checksums, registry manifests, tokens, layers) counts its bytes here.
    """

    def __init__(self, url: str, http: HttpSettings) -> None:
        self.url, self.http = url, http
        self.start, self.count = time.monotonic(), 0

    def add(self, count: int) -> None:
        self.count += count
        elapsed = time.monotonic() - self.start
        if elapsed >= self.http.rate_window_s:
            if self.count < self.http.min_rate_bytes_s * elapsed:
                raise ServerError(f"{self.url}: {human_bytes(self.count)} in {elapsed:.0f} s, slower than "
                                  f"{human_bytes(self.http.min_rate_bytes_s)}/s; cut off")
            self.start, self.count = time.monotonic(), 0


class TransferStoppedError(Exception):
    """A transfer's stop flag was set (Ctrl-C, SIGTERM, or another part failed): end this part now."""


def read_body(response: requests.Response, max_bytes: int, url: str, http: HttpSettings) -> bytes:
    """A small body (a manifest, a token), at most ``max_bytes`` + 1 bytes, under the rate floor."""
    import urllib3

    floor = RateFloor(url, http)
    data = bytearray()
    try:
        # Decoded (a mirror may gzip a checksum file), in small reads so a compressed bomb
        # never expands far past the cap in one step.
        while chunk := response.raw.read1(64 << 10, decode_content=True):
            data += chunk
            floor.add(len(chunk))
            if len(data) > max_bytes:
                break
    except urllib3.exceptions.ReadTimeoutError as err:
        raise requests.ReadTimeout(str(err)) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise requests.exceptions.ChunkedEncodingError(str(err)) from None
    return bytes(data)


def run_parallel(task: Callable[[int], None], items: list[int], workers: int, stop: threading.Event) -> None:
    """``task(item)`` for every item on up to ``workers`` daemon threads; returns when all are done.

    The first error sets ``stop`` and is raised here; so does Ctrl-C or SIGTERM arriving in the
    caller (the main thread). Tasks check ``stop`` between chunks, so the caller unwinds within
    a couple of seconds instead of waiting for every part in flight: the threads are daemons and
    are given only a short join.
    """
    pending = list(items)
    lock = threading.Lock()
    errors: list[BaseException] = []
    finished = threading.Event()
    left = [len(pending)]

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if not pending:
                    return
                item = pending.pop(0)
            try:
                task(item)
            except BaseException as err:   # handed to the caller
                with lock:
                    errors.append(err)
                stop.set()
            finally:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        finished.set()

    if not pending:
        return
    threads = [threading.Thread(target=worker, name=f"cloudbake-transfer-{n}", daemon=True)
               for n in range(max(1, min(workers, len(pending))))]
    for thread in threads:
        thread.start()
    try:
        while not finished.wait(0.2) and not stop.is_set():
            pass
    finally:
        stop.set()
        deadline = time.monotonic() + 2.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    real = [err for err in errors if not isinstance(err, TransferStoppedError)]
    if real:
        raise real[0]
    if errors:
        raise errors[0]


def _download_attempt(session: requests.Session, url: str, part: Path, validator_file: Path,
                      http: HttpSettings, expected_size: int | None) -> bool:
    """One HTTP request; True when the whole file is in ``part``."""
    validator = None
    if part.exists() and validator_file.exists():
        with contextlib.suppress(ValueError):
            validator = json.loads(validator_file.read_text()).get("validator")
    have = part.stat().st_size if (part.exists() and validator) else 0
    # The checksum is of the bytes as published: never let a server compress them on the way.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": validator or ""})
    with session.get(url, stream=True, headers=headers,
                     timeout=(http.connect_timeout_s, http.read_timeout_s)) as response:
        _check_status(response, url)
        if response.status_code == 416:
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            raise ServerError(f"{url}: the partial download no longer fits the file on the server; restarting")
        if response.status_code >= 500:
            raise ServerError(f"{url} answered {response.status_code} {response.reason}")
        if response.status_code == 206 and have:
            digest, size = _hash_existing_cached(part)
            mode = "ab"
            log.info("resuming %s at %s", part.name.removesuffix(".part"), human_bytes(have))
        else:
            if have:
                log.info("the server sent the whole file (no range support or the file changed); restarting")
            digest, size, mode = hashlib.sha256(), 0, "wb"
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise PipelineError(f"{url}: the server sent the image with Content-Encoding: {encoding}; the checksum "
                                "is of the bytes as published, so cloudbake takes them only unencoded",
                                hint="a proxy or mirror is re-encoding the file; fetch from another mirror")
        limit = expected_size if expected_size and expected_size > 0 else UNPINNED_MAX_BYTES
        length = _content_length(response, url)
        if length is not None and size + length > limit:
            raise PipelineError(f"{url}: the server announces {human_bytes(size + length)}, more than the "
                                f"{human_bytes(limit)} {'the lock pins' if limit == expected_size else 'allowed'}; "
                                "refused", hint="check source.mirror; run doit update if the image really changed")
        new_validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        write_atomically(validator_file, json.dumps({"url": url, "validator": new_validator}).encode())
        total = size + length if length is not None else expected_size
        progress = Progress(part.name.removesuffix(".part"), total, size)
        _running.pop(part, None)
        hasher = BackgroundHasher(digest)
        try:
            floor = RateFloor(url, http)
            with open(part, mode) as out:
                for chunk in body_chunks(response):
                    if size + len(chunk) > limit:
                        pinned = " (the size the lock pins)" if limit == expected_size else ""
                        raise _TooLargeError(f"{url}: the server sent more than {human_bytes(limit)}{pinned}; refused")
                    out.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                    progress.update(len(chunk))
                    floor.add(len(chunk))
        finally:
            progress.close()
            hasher.finish()
            _running[part] = (digest, size)
        if total is not None and size < total:
            raise requests.exceptions.ChunkedEncodingError(f"connection closed after {human_bytes(size)}")
        return True


class _TooLargeError(Exception):
    """More bytes than the limit: the partial download is worthless."""


def _content_length(response: requests.Response, url: str) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise PipelineError(f"{url}: the server sent a malformed Content-Length ({value[:40]!r})",
                            hint="the mirror or a proxy in between is broken; try another mirror")
    return int(value)


def _copy_local(url: str, dest: Path, sha256: str) -> None:
    source = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not source.is_file():
        raise PipelineError(f"not found: {url}", hint="check source.mirror and source.release")
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(16 << 20):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise PipelineError(f"{url}: SHA-256 mismatch: expected {sha256}, got {digest.hexdigest()}")
    os.replace(tmp, dest)
    record_verified(dest, sha256)
