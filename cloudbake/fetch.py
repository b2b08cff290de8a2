"""fetch: resolve the upstream image, verify its signed checksums, download it, pin it in a lock file.

Order matters for security: SHA256SUMS and its signature are fetched and checked
first; the image is requested only once the expected digest is known from a
signature we trust, and it is renamed into the cache only when its bytes match.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from cloudbake import __version__
from cloudbake.errors import PipelineError
from cloudbake.files import file_lock, is_verified, record_verified, write_atomically
from cloudbake.log import stage_logger, strip_credentials
from cloudbake.paths import Paths
from cloudbake.pipeline import RELEASES, Pipeline, SignaturePolicy, Source
from cloudbake.runner import require_tool, run
from cloudbake.units import human_bytes

log = stage_logger("fetch")

# Ubuntu releases cloud images are published for: version <-> codename.
SYSTEM_KEYRING = Path("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg")
KEYSERVER_URL = "https://keyserver.ubuntu.com/pks/lookup?op=get&options=mr&search=0x{fingerprint}"
SUMS_MAX_BYTES = 1 << 20
SIGNATURE_MAX_BYTES = 64 << 10
KEY_MAX_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20
LOCK_VERSION = 1
# Without a pinned size (the first fetch), a download larger than this is refused: Ubuntu's
# cloud images are well under 1 GiB; a server that never stops sending is not an image.
UNPINNED_MAX_BYTES = 16 << 30
# A signing key fetched from the keyserver is fetched again after this long, so that its
# revocation reaches this machine (docs/threat-model.md).
KEY_REFRESH_S = 7 * 24 * 3600


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


@dataclass(frozen=True)
class Upstream:
    """Where the image and its checksums live, as resolved from ``source.*``."""

    folder_url: str
    image_name: str
    serial: str | None

    @property
    def image_url(self) -> str:
        return self.folder_url + self.image_name

    @property
    def sums_url(self) -> str:
        return self.folder_url + "SHA256SUMS"

    @property
    def signature_url(self) -> str:
        return self.folder_url + "SHA256SUMS.gpg"


@dataclass(frozen=True)
class Lock:
    """What ``pipeline.lock`` pins: enough to fetch and verify the same bytes again, offline-checkable."""

    source: dict[str, str]
    url: str
    serial: str | None
    sha256: str
    size: int
    signed_by: str | None
    signature_time: str | None

    def matches(self, source: Source) -> bool:
        return self.source == lock_source(source)


def lock_source(source: Source) -> dict[str, str]:
    """What the lock records of the source; the mirror without credentials (they stay in the pipeline)."""
    return {"release": source.release, "arch": str(source.arch), "channel": source.channel,
            "mirror": strip_credentials(source.mirror)}


def with_mirror_credentials(url: str, mirror: str) -> str:
    """A URL read back from the lock, with the pipeline mirror's credentials when it is on that mirror."""
    plain_mirror = strip_credentials(mirror)
    if plain_mirror != mirror and url.startswith(plain_mirror):
        return mirror + url[len(plain_mirror):]
    return url


# --- resolve -----------------------------------------------------------------------------


def resolve_release(release: str) -> tuple[str, str | None]:
    """(codename, version) for a codename or a version; the version is None for unknown codenames."""
    if release in RELEASES:
        return RELEASES[release], release
    by_codename = {codename: version for version, codename in RELEASES.items()}
    if release in by_codename:
        return release, by_codename[release]
    if re.fullmatch(r"\d{2}\.\d{2}", release):
        raise PipelineError(f"source.release: unknown Ubuntu version {release}",
                            hint=f"use its codename instead, or one of: {', '.join(RELEASES)}")
    return release, None


def resolve_upstream(source: Source) -> Upstream:
    """URLs in Ubuntu's layout for ``source.*`` (see docs/how-it-works.md)."""
    codename, version = resolve_release(source.release)
    arch = str(source.arch)
    channel = source.channel
    if channel == "current" or re.fullmatch(r"\d{8}(\.\d+)?", channel):
        serial = None if channel == "current" else channel
        return Upstream(f"{source.mirror}{codename}/{channel}/", f"{codename}-server-cloudimg-{arch}.img", serial)
    if version is None:
        raise PipelineError(f"source.channel: {channel} needs the release's version, and {codename!r} is not a "
                            "codename cloudbake knows", hint="set source.release to the version, e.g. 24.04")
    folder = "release" if channel == "release" else channel
    serial = None if channel == "release" else channel.removeprefix("release-")
    return Upstream(f"{source.mirror}releases/{version}/{folder}/", f"ubuntu-{version}-server-cloudimg-{arch}.img",
                    serial)


# --- HTTP --------------------------------------------------------------------------------


def _session() -> requests.Session:
    session = requests.Session()
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
    last = ""
    for attempt in range(http.attempts):
        try:
            with session.get(url, stream=True, timeout=(http.connect_timeout_s, http.read_timeout_s)) as response:
                _check_status(response, url)
                if response.status_code >= 500:
                    last = f"{url} answered {response.status_code} {response.reason}"
                else:
                    data = b""
                    for chunk in response.iter_content(64 << 10):
                        data += chunk
                        if len(data) > max_bytes:
                            raise PipelineError(f"{url} is larger than {human_bytes(max_bytes)}; refusing it")
                    return data
        except requests.RequestException as err:
            if not _is_retryable(err):
                raise PipelineError(_describe(err, url, http)) from None
            last = _describe(err, url, http)
        if attempt + 1 < http.attempts:
            log.info("%s; retrying (%d/%d)", last, attempt + 2, http.attempts)
            _backoff(attempt, http)
    raise PipelineError(f"{last} (gave up after {http.attempts} attempts)", hint="check the network and the mirror")


# --- signature ---------------------------------------------------------------------------


def dearmor(data: bytes, what: str = "OpenPGP data") -> bytes:
    """Binary OpenPGP data from ASCII armor (gpgv 2.2 reads only binary keyrings); binary passes through."""
    text = data.decode("ascii", errors="replace")
    if "-----BEGIN PGP" not in text:
        return data
    try:
        return _dearmor_text(text)
    except (IndexError, ValueError):
        raise PipelineError(f"{what}: malformed ASCII armor (no valid base64 between the BEGIN and END lines)",
                            hint="get the file again; an armored key or signature starts with "
                                 "'-----BEGIN PGP' and is base64 inside") from None


def _dearmor_text(text: str) -> bytes:
    body = text.split("-----BEGIN PGP", 1)[1].split("\n", 1)[1]
    body = body.split("-----END PGP", 1)[0]
    lines = body.strip().splitlines()
    # Armor headers end at the first blank line; the last line may be the CRC (=XXXX).
    if "" in [line.strip() for line in lines]:
        lines = lines[[line.strip() for line in lines].index("") + 1:]
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("=")]
    return base64.b64decode("".join(lines), validate=True)


def _packets(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of each OpenPGP packet (RFC 4880 section 4.2)."""
    pos = 0
    while pos < len(data):
        header = data[pos]
        if not header & 0x80:
            raise ValueError("not OpenPGP data")
        if header & 0x40:  # new format
            tag = header & 0x3F
            first = data[pos + 1]
            if first < 192:
                length, pos = first, pos + 2
            elif first < 224:
                length, pos = ((first - 192) << 8) + data[pos + 2] + 192, pos + 3
            elif first == 255:
                length, pos = int.from_bytes(data[pos + 2:pos + 6], "big"), pos + 6
            else:
                raise ValueError("partial packet lengths are not used in keys")
        else:
            tag = (header >> 2) & 0x0F
            kind = header & 0x03
            size = {0: 1, 1: 2, 2: 4}.get(kind)
            if size is None:
                raise ValueError("indeterminate packet length")
            length, pos = int.from_bytes(data[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        yield tag, data[pos:pos + length]
        pos += length


def _fingerprints_or_none(keyring: bytes) -> list[str]:
    try:
        return key_fingerprints(keyring)
    except (ValueError, IndexError):
        return []


def key_fingerprints(keyring: bytes) -> list[str]:
    """v4 fingerprints of the primary keys and subkeys in a binary keyring."""
    found = []
    for tag, body in _packets(keyring):
        if tag in (6, 14) and body and body[0] == 4:
            prefix = b"\x99" + len(body).to_bytes(2, "big")
            found.append(hashlib.sha1(prefix + body).hexdigest().upper())  # v4 fingerprints are SHA-1 by definition
    return found


def resolve_keyring(pipeline: Pipeline, paths: Paths, session: requests.Session, http: HttpSettings) -> Path:
    """source.verify.keyring; else the system's Ubuntu keyring; else the pinned key from the keyserver."""
    verify = pipeline.source.verify
    if verify.keyring is not None:
        return _binary_keyring(verify.keyring.read_bytes(), paths, label=str(verify.keyring))
    if SYSTEM_KEYRING.is_file():
        return SYSTEM_KEYRING
    keys_dir = paths.cache_dir / "keys"
    stale: Path | None = None
    for fingerprint in verify.fingerprints:
        cached = keys_dir / f"{fingerprint}.gpg"
        if cached.is_file() and fingerprint in _fingerprints_or_none(cached.read_bytes()):
            if time.time() - cached.stat().st_mtime < KEY_REFRESH_S:
                return cached
            stale = stale or cached  # refreshed below, so that a revocation can arrive
    for fingerprint in verify.fingerprints:
        url = KEYSERVER_URL.format(fingerprint=fingerprint)
        log.info("fetching signing key %s from %s", fingerprint, url.split("/pks/")[0])
        try:
            key = dearmor(fetch_small(session, url, KEY_MAX_BYTES, http), url)
        except PipelineError as err:
            if stale is None:
                raise
            age_days = (time.time() - stale.stat().st_mtime) / 86400
            log.warning("could not refresh signing key %s (%s); using the copy fetched %.0f days ago, so a "
                        "revocation published since then is not seen", fingerprint, err.message, age_days)
            return stale
        present = _fingerprints_or_none(key)
        if fingerprint not in present:
            raise PipelineError(f"the keyserver returned a key that is not {fingerprint}; refusing it",
                                hint="set source.verify.keyring to a keyring you trust")
        cached = keys_dir / f"{fingerprint}.gpg"
        write_atomically(cached, key)
        return cached
    raise PipelineError("no keyring for the signature check")  # unreachable: fingerprints has minItems 1


def _binary_keyring(data: bytes, paths: Paths, label: str) -> Path:
    binary = dearmor(data, label)
    if binary == data:
        return Path(label)
    dest = paths.cache_dir / "keys" / f"dearmored-{hashlib.sha256(binary).hexdigest()[:16]}.gpg"
    if not dest.is_file():
        write_atomically(dest, binary)
    return dest


# gpgv status codes that refuse a signature whatever else it says.
SIGNATURE_REFUSALS = {
    "REVKEYSIG": "it was made by a key that has been revoked",
    "EXPKEYSIG": "it was made by a key that has expired",
    "EXPSIG": "the signature itself has expired",
    "BADSIG": "the signature does not match SHA256SUMS (tampered or corrupted)",
    "ERRSIG": "the signature could not be checked (unknown key or algorithm)",
}


@dataclass(frozen=True)
class Signature:
    fingerprint: str
    created: str  # ISO 8601, UTC


def check_signature(sums: bytes, signature: bytes, keyring: Path, fingerprints: tuple[str, ...]) -> Signature:
    """gpgv's machine-readable verdict; accepted only for a pinned fingerprint."""
    gpgv = require_tool("gpgv", "gpgv")
    with tempfile.TemporaryDirectory(prefix="cloudbake-gpgv-") as tmp:
        sums_file, sig_file = Path(tmp) / "SHA256SUMS", Path(tmp) / "SHA256SUMS.gpg"
        sums_file.write_bytes(sums)
        sig_file.write_bytes(dearmor(signature, "SHA256SUMS.gpg"))
        result = run([gpgv, "--homedir", tmp, "--status-fd", "1", "--keyring", keyring, sig_file, sums_file],
                     stage="fetch", timeout=60, check=False)
    status = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    status = [fields for fields in status if fields]
    valid = [fields for fields in status if fields[0] == "VALIDSIG"]
    refused = [fields for fields in status if fields[0] in SIGNATURE_REFUSALS]
    if refused:
        # gpgv can print VALIDSIG beside these (a revoked key's signature is cryptographically valid):
        # any of them refuses the signature.
        code = refused[0][0]
        reason = SIGNATURE_REFUSALS[code]
        if code == "ERRSIG" and any(fields[0] == "NO_PUBKEY" for fields in status):
            reason = "it was made by a key that is not in the keyring"
        raise PipelineError(f"SHA256SUMS signature check failed: {reason} (gpgv: {code})",
                            hint=f"keyring used: {keyring}; the image was not downloaded")
    if result.returncode != 0 or not valid:
        codes = sorted({fields[0] for fields in status} - {"NEWSIG", "KEY_CONSIDERED"})
        if "NO_PUBKEY" in codes or "ERRSIG" in codes:
            reason = "it was made by a key that is not in the keyring"
        elif "BADSIG" in codes:
            reason = "the signature does not match SHA256SUMS (tampered or corrupted)"
        else:
            reason = f"gpgv said {', '.join(codes) or 'nothing'}"
        raise PipelineError(f"SHA256SUMS signature check failed: {reason}",
                            hint=f"keyring used: {keyring}; the image was not downloaded")
    fields = valid[0]
    signer = fields[1].upper()
    primary = fields[10].upper() if len(fields) > 10 else signer
    if signer not in fingerprints and primary not in fingerprints:
        raise PipelineError(f"SHA256SUMS is signed by {primary}, which is not in source.verify.fingerprints",
                            hint="add that fingerprint only if you trust its owner; the image was not downloaded")
    created = dt.datetime.fromtimestamp(int(fields[3]), dt.UTC).isoformat().replace("+00:00", "Z")
    return Signature(primary if primary in fingerprints else signer, created)


def parse_sums(text: str, url: str) -> dict[str, str]:
    """name -> sha256 from SHA256SUMS: `<hex> *<name>`, `<hex>  <name>`, `./name`, blank lines."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"(\S+)\s+\*?(?:\./)?(.+)", line)
        if not match or not re.fullmatch(r"[0-9a-fA-F]{64}", match.group(1)):
            raise PipelineError(f"{url}:{number}: malformed line in SHA256SUMS: {raw[:100]!r}",
                                hint="expected '<64 hex digits> *<file name>'")
        entries[match.group(2)] = match.group(1).lower()
    return entries


# --- download ----------------------------------------------------------------------------


class _Progress:
    """A progress bar on a terminal; otherwise a log line every 10 % or 30 s."""

    def __init__(self, name: str, total: int | None, start: int) -> None:
        self.name, self.total, self.done = name, total, start
        self.bar: Any = None
        self.next_percent, self.last_log = 10, time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f"[fetch] {name}", leave=False, dynamic_ncols=True)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        percent = int(self.done * 100 / self.total) if self.total else 0
        if percent >= self.next_percent or now - self.last_log >= 30:
            log.info("%s: %s%s", self.name, human_bytes(self.done),
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
        last_error = ""
        for attempt in range(http.attempts):
            try:
                done = _download_attempt(session, url, part, validator_file, http, expected_size)
                if done:
                    break
            except requests.RequestException as err:
                if not _is_retryable(err):
                    raise PipelineError(_describe(err, url, http)) from None
                last_error = _describe(err, url, http)
            except _ServerError as err:
                last_error = str(err)
            except _TooLargeError as err:
                part.unlink(missing_ok=True)
                validator_file.unlink(missing_ok=True)
                _running.pop(part, None)
                raise PipelineError(str(err), hint="check source.mirror; run doit update if the image really "
                                                   "changed") from None
            if attempt + 1 == http.attempts:
                raise PipelineError(f"{last_error} (gave up after {http.attempts} attempts; "
                                    f"{human_bytes(part.stat().st_size if part.exists() else 0)} kept in {part} "
                                    "for the next run to resume)", hint="check the network and the mirror")
            log.info("%s; retrying (%d/%d)", last_error, attempt + 2, http.attempts)
            _backoff(attempt, http)
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


class _ServerError(Exception):
    pass


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


def _body_chunks(response: requests.Response) -> Iterator[bytes]:
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
            raise _ServerError(f"{url}: the partial download no longer fits the file on the server; restarting")
        if response.status_code >= 500:
            raise _ServerError(f"{url} answered {response.status_code} {response.reason}")
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
        progress = _Progress(part.name.removesuffix(".part"), total, size)
        _running.pop(part, None)
        hasher = BackgroundHasher(digest)
        try:
            window_start, window_bytes = time.monotonic(), 0
            with open(part, mode) as out:
                for chunk in _body_chunks(response):
                    if size + len(chunk) > limit:
                        pinned = " (the size the lock pins)" if limit == expected_size else ""
                        raise _TooLargeError(f"{url}: the server sent more than {human_bytes(limit)}{pinned}; refused")
                    out.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                    progress.update(len(chunk))
                    window_bytes += len(chunk)
                    elapsed = time.monotonic() - window_start
                    if elapsed >= http.rate_window_s:
                        if window_bytes < http.min_rate_bytes_s * elapsed:
                            raise _ServerError(f"{url}: {human_bytes(window_bytes)} in {elapsed:.0f} s, slower than "
                                               f"{human_bytes(http.min_rate_bytes_s)}/s; cut off")
                        window_start, window_bytes = time.monotonic(), 0
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


# --- the stage ---------------------------------------------------------------------------


def cached_image_path(paths: Paths, sha256: str, name: str) -> Path:
    """Downloads are named by digest: a pinned digest finds its file without the network."""
    return paths.images_cache / f"{sha256[:16]}-{name}"


def read_lock(file: Path) -> Lock | None:
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
        if data.get("cloudbake_lock") != LOCK_VERSION:
            raise ValueError(f"unknown lock version {data.get('cloudbake_lock')!r}")
        lock = Lock(source=data["source"], url=data["url"], serial=data["serial"], sha256=data["sha256"],
                    size=data["size"], signed_by=data["signed_by"], signature_time=data["signature_time"])
        _check_lock_values(lock)
        return lock
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{file}: not a valid cloudbake lock file ({err})",
                            hint="delete it and run doit update to write it again") from None


def _check_lock_values(lock: Lock) -> None:
    """A lock is input like any other: its digest names a file in the cache, its URL is fetched."""
    if not isinstance(lock.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", lock.sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, not {lock.sha256!r}")
    if not isinstance(lock.url, str) or not lock.url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"url must be an http(s):// or file:// URL, not {lock.url!r}")
    if not isinstance(lock.size, int) or isinstance(lock.size, bool) or lock.size < -1:
        raise ValueError(f"size must be a number of bytes, not {lock.size!r}")
    if not isinstance(lock.source, dict) or not all(isinstance(v, str) for v in lock.source.values()):
        raise ValueError("source must be a mapping of strings")
    for name in ("serial", "signed_by", "signature_time"):
        value = getattr(lock, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or null, not {value!r}")


def write_lock(file: Path, lock: Lock) -> None:
    data = {"cloudbake_lock": LOCK_VERSION, **asdict(lock)}
    write_atomically(file, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def resolve_and_verify(pipeline: Pipeline, paths: Paths, session: requests.Session, http: HttpSettings) -> Lock:
    """Steps 1-3: checksums and signature; returns what to download, never touching the image."""
    source = pipeline.source
    upstream = resolve_upstream(source)
    log.info("resolving %s", upstream.image_url)
    sums = fetch_small(session, upstream.sums_url, SUMS_MAX_BYTES, http)
    signature: Signature | None = None
    if source.verify.signature is SignaturePolicy.off:
        log.warning("SIGNATURE CHECK OFF (source.verify.signature: off): SHA256SUMS from %s is trusted as served; "
                    "anyone who can alter the mirror or the connection can alter the image", upstream.sums_url)
    else:
        sig = fetch_small(session, upstream.signature_url, SIGNATURE_MAX_BYTES, http)
        keyring = resolve_keyring(pipeline, paths, session, http)
        signature = check_signature(sums, sig, keyring, source.verify.fingerprints)
        log.info("SHA256SUMS signed by %s at %s", signature.fingerprint, signature.created)
    entries = parse_sums(sums.decode("utf-8", errors="replace"), upstream.sums_url)
    if upstream.image_name not in entries:
        raise PipelineError(f"{upstream.sums_url} has no entry for {upstream.image_name}",
                            hint=f"it lists: {', '.join(sorted(entries)[:8])}")
    sha256 = entries[upstream.image_name]
    if source.verify.sha256 and source.verify.sha256 != sha256:
        raise PipelineError(f"source.verify.sha256 pins {source.verify.sha256} but SHA256SUMS says {sha256} for "
                            f"{upstream.image_name}", hint="update the pin if the new image is expected")
    serial = upstream.serial or _build_serial(session, upstream, http)
    return Lock(source=lock_source(source), url=strip_credentials(upstream.image_url), serial=serial,
                sha256=sha256, size=-1, signed_by=signature.fingerprint if signature else None,
                signature_time=signature.created if signature else None)


def _build_serial(session: requests.Session, upstream: Upstream, http: HttpSettings) -> str | None:
    """The serial of a floating folder, from unpacked/build-info.txt when the mirror has it."""
    try:
        info = fetch_small(session, upstream.folder_url + "unpacked/build-info.txt", 64 << 10,
                           HttpSettings(http.connect_timeout_s, http.read_timeout_s, attempts=1))
    except PipelineError:
        return None
    match = re.search(r"^serial=(\S+)$", info.decode(errors="replace"), re.MULTILINE)
    return match.group(1) if match else None


def _serial_order(serial: str | None) -> tuple[int, ...] | None:
    if serial is None or not re.fullmatch(r"\d+(?:\.\d+)*", serial):
        return None
    return tuple(int(part) for part in serial.split("."))


def check_not_older(pinned: Lock | None, resolved: Lock, allow_downgrade: bool) -> None:
    """Refuse a signed set older than the pinned one (a mirror replaying an old, signed release).

    Serial and signature time are compared where both sides have them; either going
    backwards refuses, unless the user asked for the downgrade explicitly.
    """
    if pinned is None or allow_downgrade or pinned.source != resolved.source:
        return
    old_serial, new_serial = _serial_order(pinned.serial), _serial_order(resolved.serial)
    older_serial = old_serial is not None and new_serial is not None and new_serial < old_serial
    older_signature = bool(pinned.signature_time and resolved.signature_time
                           and resolved.signature_time < pinned.signature_time)
    if older_serial or older_signature:
        raise PipelineError(
            f"the mirror now offers an older image than the one pinned: serial {resolved.serial} signed "
            f"{resolved.signature_time or 'unsigned'}, pinned serial {pinned.serial} signed "
            f"{pinned.signature_time or 'unsigned'}; the lock was left as it is",
            hint="a mirror serving an old signed release can be a replay attack; if you really want the older "
                 "image, run doit update downgrade=1")


def ensure_image(pipeline: Pipeline, paths: Paths, *, update: bool = False, allow_downgrade: bool = False,
                 http: HttpSettings | None = None) -> tuple[Path, Lock]:
    """The verified upstream image in the cache, and the lock that pins it (written when new).

    With a matching lock and the image cached, no network is used. ``update``
    re-resolves even when a lock exists.
    """
    http = http or HttpSettings()
    lock = read_lock(paths.lock_file)
    if lock is not None and not lock.matches(pipeline.source) and not update:
        raise PipelineError(f"{paths.lock_file} pins {lock.source} but the pipeline's source is now "
                            f"{lock_source(pipeline.source)}", hint="run doit update to resolve and pin it again")
    name = Path(urllib.parse.urlparse(lock.url if lock and not update else resolve_upstream(pipeline.source)
                                      .image_url).path).name
    if lock is not None and not update:
        image = cached_image_path(paths, lock.sha256, name)
        if is_verified(image, lock.sha256):
            log.info("cached: %s (pinned by %s)", image, paths.lock_file.name)
            return image, lock
        log.info("downloading the image pinned by %s", paths.lock_file.name)
        with _session() as session:
            try:
                download(session, with_mirror_credentials(lock.url, pipeline.source.mirror), image, lock.sha256,
                         http, expected_size=lock.size if lock.size > 0 else None)
            except PipelineError as err:
                if "mismatch" in err.message:
                    raise PipelineError(f"{lock.url} no longer serves the image pinned by {paths.lock_file} "
                                        f"(sha256 {lock.sha256})", hint="run doit update to pin the current image") \
                        from None
                raise
        return image, lock
    with _session() as session:
        resolved = resolve_and_verify(pipeline, paths, session, http)
        check_not_older(lock, resolved, allow_downgrade)
        upstream_url = with_mirror_credentials(resolved.url, pipeline.source.mirror)
        image = cached_image_path(paths, resolved.sha256, name)
        download(session, upstream_url, image, resolved.sha256, http)
    resolved = Lock(**{**asdict(resolved), "size": image.stat().st_size})
    if lock != resolved:
        write_lock(paths.lock_file, resolved)
        log.info("pinned %s (sha256 %s…, serial %s) in %s", resolved.url, resolved.sha256[:12], resolved.serial,
                 paths.lock_file)
    return image, resolved


def cached_upstream(pipeline: Pipeline, paths: Paths) -> Path | None:
    """The verified upstream image the lock pins, if it is in the cache; no network. Errors mean None."""
    try:
        lock = read_lock(paths.lock_file)
    except PipelineError:
        return None
    if lock is None or not lock.matches(pipeline.source):
        return None
    image = cached_image_path(paths, lock.sha256, Path(urllib.parse.urlparse(lock.url).path).name)
    return image if is_verified(image, lock.sha256) else None


def run_fetch(pipeline: Pipeline, paths: Paths) -> None:
    ensure_image(pipeline, paths)


def run_update(pipeline: Pipeline, paths: Paths, allow_downgrade: bool = False) -> None:
    ensure_image(pipeline, paths, update=True, allow_downgrade=allow_downgrade)
