"""Fetch, verify and safely extract a data set archive (MVTec AD by default).

- one process at a time: a file lock in the root (Lightning also calls ``prepare_data`` on
  local rank 0 only);
- resume: a partial ``<archive>.part`` is continued with an HTTP ``Range`` request;
- retries with exponential backoff for server errors and broken transfers, but none when the
  host cannot be reached at all: offline runs stop at once with the manual route;
- the SHA-256 from the config is checked before anything is extracted;
- extraction refuses absolute paths, ``..``, links leaving the root and special files, and goes
  through a staging folder, so an interrupted run never leaves a half category behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

__all__ = [
    "DownloadError",
    "UnsafeArchiveError",
    "download_file",
    "ensure_archive_extracted",
    "safe_extract",
    "sha256sum",
]

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # bytes per read


class DownloadError(RuntimeError):
    """The archive could not be fetched or verified; the message says how to get it by hand."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction folder (or is a special file)."""


# ---------------------------------------------------------------------------- checksum


def sha256sum(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- download


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    timeout_s: float = 10.0,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress: bool = True,
    manual_hint: str = "",
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed with HTTP Range).

    ``timeout_s`` bounds the connection and every read. A host that cannot be reached fails at
    once; HTTP 429/5xx and broken transfers are retried ``retries`` times, waiting
    ``backoff_s * 2**attempt`` seconds. HTTP 4xx other than 429 is not retried.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, timeout_s, progress)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as err:
            if err.code != 429 and err.code < 500:
                raise DownloadError(
                    f"downloading {url} failed: HTTP {err.code} {err.reason}. The upstream link "
                    f"may have moved; set data.download.url (and data.download.sha256). "
                    f"{manual_hint}"
                ) from err
            failure: BaseException = err
        except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
            failure = err  # broken transfer: retry, resuming from what arrived
        except ValueError as err:  # e.g. an empty or malformed data.download.url
            raise DownloadError(f"invalid download URL {url!r} ({err}). {manual_hint}") from err
        except urllib.error.URLError as err:
            # No connection at all (DNS, refused, no route, connect timeout): retrying would
            # only make an offline run wait, so stop now with the manual route.
            raise DownloadError(
                f"cannot reach {url} ({err.reason}); this machine seems to be offline. "
                f"{manual_hint}"
            ) from err
        if attempt >= retries:
            raise DownloadError(
                f"downloading {url} failed after {retries + 1} attempts ({failure}); the partial "
                f"file {part} is kept and the next run resumes it. {manual_hint}"
            ) from failure
        wait = backoff_s * 2**attempt
        log.warning("download interrupted (%s); retrying in %.0f s", failure, wait)
        time.sleep(wait)
        attempt += 1


def _fetch_once(url: str, part: Path, timeout_s: float, progress: bool) -> None:
    """One HTTP request: continue ``part`` from its size (206) or start over (200)."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cfa-lightning"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is already complete
            return
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"Downloading {part.name[: -len('.part')]}",
                disable=not progress,
            ) as bar,
        ):
            while block := response.read(CHUNK):
                f.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


# ---------------------------------------------------------------------------- extraction


def _check_name(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(
            f"{archive} holds the member {name!r}, which would be written outside the "
            "extraction folder; refusing to extract it. Download the archive again from the "
            "official source."
        )
    return path


def _check_tar_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = []
    for member in tar.getmembers():
        path = _check_name(member.name, archive)
        if member.issym() or member.islnk():
            # symlinks resolve from the member's folder, hard links from the archive root
            base = path.parent if member.issym() else PurePosixPath()
            link = PurePosixPath(member.linkname.replace("\\", "/"))
            if link.is_absolute() or _normalised(base / link).parts[:1] == ("..",):
                raise UnsafeArchiveError(
                    f"{archive}: link {member.name!r} -> {member.linkname!r} points outside "
                    "the extraction folder; refusing to extract it."
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"{archive} holds {member.name!r}, a device or FIFO; refusing to extract it."
            )
        members.append(member)
    return members


def _normalised(path: PurePosixPath) -> PurePosixPath:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if not parts:
                return PurePosixPath("..")
            parts.pop()
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar (any compression) or zip archive into ``dest``; raise on unsafe members."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                _check_name(name, archive)
            zf.extractall(dest)
        return dest
    if not tarfile.is_tarfile(archive):
        raise DownloadError(f"{archive} is neither a tar nor a zip archive; download it again")
    with tarfile.open(archive) as tar:
        members = _check_tar_members(tar, archive)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: a second line of defence
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Pythons; the checks above still apply
            tar.extractall(dest, members=members)
    return dest


# ---------------------------------------------------------------------------- the whole step


def _move_into(staging: Path, root: Path, wanted: Iterable[str]) -> list[str]:
    """Move the extracted top-level entries into ``root`` (descending into one wrapper folder)."""
    entries = [p for p in staging.iterdir() if not p.name.startswith(".")]
    wanted = set(wanted)
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in wanted:
        entries = list(entries[0].iterdir())  # e.g. mvtec_anomaly_detection/<category>/...
    moved = []
    for entry in entries:
        target = root / entry.name
        if target.exists():
            continue  # never overwrite what the user already has
        os.replace(entry, target)
        moved.append(entry.name)
    return moved


def ensure_archive_extracted(
    root: str | os.PathLike,
    wanted: str,
    *,
    url: str,
    sha256: str | None,
    archive_name: str,
    keep_archive: bool = False,
    timeout_s: float = 10.0,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress: bool = True,
    manual_hint: str = "",
) -> Path:
    """Make ``<root>/<wanted>`` exist by downloading and extracting the archive, once.

    An archive already at ``<root>/<archive_name>`` (e.g. fetched by hand) is used instead of
    downloading, and kept; a downloaded one is deleted after extraction unless
    ``keep_archive``. Returns ``<root>/<wanted>``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / wanted
    lock_path = root / f".{archive_name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(
            "another process is downloading into %s; waiting for it (lock %s)", root, lock_path
        )
        lock.acquire()
    try:
        if target.is_dir():  # done by another process while we waited
            return target
        archive = root / archive_name
        downloaded = False
        if not archive.is_file():
            log.info("%s not found; downloading %s to %s", target, url, archive)
            download_file(
                url,
                archive,
                timeout_s=timeout_s,
                retries=retries,
                backoff_s=backoff_s,
                progress=progress,
                manual_hint=manual_hint,
            )
            downloaded = True
        if sha256:
            got = sha256sum(archive)
            if got.lower() != sha256.lower():
                if downloaded:
                    archive.unlink()
                raise DownloadError(
                    f"checksum mismatch for {archive}: SHA-256 {got}, expected {sha256} "
                    f"(data.download.sha256). "
                    + (
                        "The corrupt download was removed; run again to fetch it anew. "
                        if downloaded
                        else "Replace the file with a complete copy. "
                    )
                    + "If the upstream archive changed on purpose, update data.download.sha256."
                )
        else:
            log.warning("data.download.sha256 is not set: %s is extracted unverified", archive)
        staging = root / f".extract-{uuid.uuid4().hex[:8]}"
        try:
            log.info("extracting %s into %s", archive, root)
            safe_extract(archive, staging)
            moved = _move_into(staging, root, [wanted])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise DownloadError(
                f"{archive} was extracted but holds no folder {wanted!r} (it held: "
                f"{', '.join(sorted(moved)) or 'nothing new'}). Check data.download.url. "
                f"{manual_hint}"
            )
        if downloaded and not keep_archive:  # an archive put there by hand stays
            archive.unlink()
        return target
    finally:
        lock.release()
