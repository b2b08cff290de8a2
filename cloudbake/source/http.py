"""HTTP for cloudbake: one session, one retry loop, bounded small fetches and bodies, progress lines,
a floor under the transfer rate, and parallel transfers that stop together.

Resumable verified downloads of large files are ``download``'s.
"""

from __future__ import annotations

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
from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger, strip_credentials
from cloudbake.core.units import human_bytes

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

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """A redirect from TLS to plain HTTP is refused: checksums that nothing signs (Debian's) are only
        as good as the channel, and no other download needs to leave TLS either."""
        target: str | None = super().get_redirect_target(resp)
        if target and urllib.parse.urlparse(resp.url).scheme == "https":
            absolute = urllib.parse.urljoin(resp.url, target)
            if urllib.parse.urlparse(absolute).scheme != "https":
                raise PipelineError(f"{strip_credentials(resp.url)} redirects to {strip_credentials(absolute)}, from "
                                    "TLS to plain HTTP; refused", hint="use a mirror that stays on https://")
        return target

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


def check_status(response: requests.Response, url: str) -> None:
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
            check_status(response, url)
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


class ServerError(Exception):
    """A 5xx, a 429 or a cut-off: worth another attempt (the retry loop's kind of error)."""


def body_chunks(response: requests.Response, size: int = CHUNK_BYTES, *, decode: bool = False) -> Iterator[bytes]:
    """The body as it arrives; unlike iter_content, bytes received before a drop are not lost in a buffer.

    A drop or a stall is the retry loop's kind of error (requests' own types). ``decode``
    undoes a Content-Encoding (a mirror may gzip a checksum file); images are never decoded.
    """
    import urllib3

    raw = response.raw
    try:
        while chunk := raw.read1(size, decode_content=decode):
            yield chunk
    except urllib3.exceptions.ReadTimeoutError as err:
        raise requests.ReadTimeout(str(err)) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
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
    floor = RateFloor(url, http)
    data = bytearray()
    # Decoded, in small reads, so a compressed bomb never expands far past the cap in one step.
    for chunk in body_chunks(response, 64 << 10, decode=True):
        data += chunk
        floor.add(len(chunk))
        if len(data) > max_bytes:
            break
    return bytes(data)


def run_parallel(task: Callable[[int], None], items: list[int], workers: int, stop: threading.Event) -> None:
    """``task(item)`` for every item on up to ``workers`` daemon threads; returns when all are done.

    (Its length is the worker, the wait and the unwinding, which belong together: split, each
    part would need the others' state.)

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
