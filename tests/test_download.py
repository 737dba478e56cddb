"""Tests for data/download.py against a local HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfa_lightning.data import MVTecDataModule
from cfa_lightning.data.download import (
    DownloadError,
    UnsafeArchiveError,
    download_file,
    ensure_archive_extracted,
    safe_extract,
)
from cfa_lightning.data.layout import MVTEC_URL


def _png(value: int, size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _mini_mvtec() -> bytes:
    """A two-category archive in the MVTec layout, with its license file at the top."""
    files = {"license.txt": b"CC BY-NC-SA 4.0"}
    for category in ("bottle", "screw"):
        for i in range(3):
            files[f"{category}/train/good/{i:03d}.png"] = _png(100 + i)
        files[f"{category}/test/good/000.png"] = _png(90)
        files[f"{category}/test/broken/000.png"] = _png(200)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10:20] = 255
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        files[f"{category}/ground_truth/broken/000_mask.png"] = buffer.getvalue()
    return _tar_xz(files)


class _Server:
    """Serves one payload at /archive with Range support; can fail on purpose."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.requests: list[dict] = []
        self.cut_first_after: int | None = None  # drop the first response after this many bytes
        self.errors: list[int] = []  # HTTP codes to answer with first, one per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path != "/archive":
                    self.send_error(404)
                    return
                if server.errors:
                    self.send_error(server.errors.pop(0))
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    total = len(server.payload)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first_after is not None:
                    cut, server.cut_first_after = server.cut_first_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archive"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def archive() -> bytes:
    return _mini_mvtec()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/archive"  # nothing listens there any more


# ---------------------------------------------------------------------------- whole path


def test_datamodule_downloads_verifies_extracts_and_trains_on_it(tmp_path, archive):
    root = tmp_path / "mvtec_ad"
    with _Server(archive) as server:
        download = {"enabled": True, "url": server.url, "sha256": _sha(archive), "backoff_s": 0}
        dm = MVTecDataModule(str(root), "screw", image_size=32, download=download)
        dm.prepare_data()
        assert len(server.requests) == 1
        dm.setup("fit")
    assert (root / "bottle/train/good/000.png").is_file()  # the whole archive is extracted
    assert (root / "license.txt").is_file()
    assert not (root / "mvtec_anomaly_detection.tar.xz").exists()  # keep_archive=false
    assert not list(root.glob(".extract-*")) and not list(root.glob("*.part"))
    assert len(dm.train_set) + len(dm.val_set) == 3 and len(dm.test_set) == 2 and dm.has_masks
    MVTecDataModule(str(root), "screw", download=download).prepare_data()  # present: no request
    assert len(server.requests) == 1


def test_resume_of_a_broken_transfer_with_range(tmp_path, archive):
    with _Server(archive) as server:
        server.cut_first_after = len(archive) // 3
        path = download_file(server.url, tmp_path / "a.tar.xz", backoff_s=0, progress=False)
    assert path.read_bytes() == archive
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(archive) // 3}-"]


def test_existing_part_file_is_resumed(tmp_path, archive):
    (tmp_path / "a.tar.xz.part").write_bytes(archive[:100])
    with _Server(archive) as server:
        download_file(server.url, tmp_path / "a.tar.xz", progress=False)
    assert (tmp_path / "a.tar.xz").read_bytes() == archive
    assert server.requests[0]["range"] == "bytes=100-"


def test_server_errors_are_retried_client_errors_are_not(tmp_path, archive):
    with _Server(archive) as server:
        server.errors = [503, 500]
        download_file(server.url, tmp_path / "a", retries=2, backoff_s=0, progress=False)
        assert len(server.requests) == 3
        server.errors = [503, 503, 503]
        with pytest.raises(DownloadError, match="after 2 attempts"):
            download_file(server.url, tmp_path / "b", retries=1, backoff_s=0, progress=False)
        n = len(server.requests)
        with pytest.raises(DownloadError, match=r"HTTP 404.*data.download.url"):
            download_file(server.url + "/moved", tmp_path / "c", retries=3, progress=False)
        assert len(server.requests) == n + 1  # no retry


def test_offline_stops_at_once_with_the_manual_route(tmp_path):
    root = tmp_path / "mvtec_ad"
    download = {"enabled": True, "url": _closed_port_url(), "sha256": None, "retries": 5}
    start = time.perf_counter()
    with pytest.raises(DownloadError) as info:
        MVTecDataModule(str(root), "bottle", download=download).prepare_data()
    assert time.perf_counter() - start < 5  # no minutes of retries
    message = str(info.value)
    assert "offline" in message and MVTEC_URL in message
    assert str(root / "mvtec_anomaly_detection.tar.xz") in message  # where to put it
    assert "data.root=" in message  # how to point at an existing copy


def test_missing_url_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="invalid download URL ''.*put the archive"):
        MVTecDataModule(str(tmp_path), "wood", download={"enabled": True, "url": ""}).prepare_data()


def test_checksum_mismatch_removes_the_download_and_extracts_nothing(tmp_path, archive):
    root = tmp_path / "r"
    with _Server(archive) as server, pytest.raises(DownloadError, match="checksum mismatch"):
        ensure_archive_extracted(
            root, "bottle", url=server.url, sha256="0" * 64, archive_name="m.tar.xz"
        )
    assert sorted(p.name for p in root.iterdir()) == [".m.tar.xz.lock"]


def test_archive_placed_by_hand_is_used_without_network(tmp_path, archive):
    root = tmp_path / "r"
    root.mkdir()
    (root / "m.tar.xz").write_bytes(archive)
    target = ensure_archive_extracted(
        root, "screw", url=_closed_port_url(), sha256=_sha(archive), archive_name="m.tar.xz"
    )
    assert target == root / "screw" and (root / "m.tar.xz").is_file()  # the user's file stays

    (root / "n.tar.xz").write_bytes(archive[:-10])  # a damaged copy by hand is not deleted
    with pytest.raises(DownloadError, match="Replace the file"):
        ensure_archive_extracted(root, "x", url="", sha256=_sha(archive), archive_name="n.tar.xz")
    assert (root / "n.tar.xz").is_file()


def test_one_download_when_processes_race(tmp_path, archive):
    root = tmp_path / "r"
    errors: list[BaseException] = []
    with _Server(archive) as server:

        def worker():
            try:
                ensure_archive_extracted(
                    root, "bottle", url=server.url, sha256=_sha(archive), archive_name="m.tar.xz"
                )
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors and len(server.requests) == 1
    assert (root / "bottle/test/broken/000.png").is_file()


def test_archive_with_a_wrapper_folder_and_without_the_category(tmp_path):
    data = _tar_xz({"mvtec_anomaly_detection/wood/train/good/0.png": _png(1)})
    (tmp_path / "w.tar.xz").write_bytes(data)
    ensure_archive_extracted(tmp_path, "wood", url="", sha256=None, archive_name="w.tar.xz")
    assert (tmp_path / "wood/train/good/0.png").is_file()
    (tmp_path / "x.tar.xz").write_bytes(data)
    with pytest.raises(DownloadError, match="holds no folder 'tile'"):
        ensure_archive_extracted(tmp_path, "tile", url="", sha256=None, archive_name="x.tar.xz")


# ---------------------------------------------------------------------------- safe extraction


def _crafted_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("bottle/ok.txt")
        tar.addfile(ok, io.BytesIO(b""))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def _fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../evil.txt"),
        tarfile.TarInfo("bottle/../../evil.txt"),
        tarfile.TarInfo("/tmp/evil.txt"),
        _symlink("bottle/link", "../../evil.txt"),
        _symlink("bottle/abs", "/etc/passwd"),
        _hardlink("bottle/hard", "../evil.txt"),
        _fifo("bottle/fifo"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-out",
        "symlink-abs",
        "hardlink-out",
        "fifo",
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, member):
    data = b"x" if member.isfile() else b""
    archive = _crafted_tar(tmp_path / "evil.tar", member, data)
    dest = tmp_path / "a" / "b"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(archive, dest)
    assert not list((tmp_path / "a").rglob("*.txt"))  # nothing written, not even the safe member
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a/evil.txt").exists()


def test_links_inside_the_root_are_kept(tmp_path):
    archive = _crafted_tar(tmp_path / "ok.tar", _symlink("bottle/alias.txt", "ok.txt"))
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/bottle/alias.txt").is_symlink()


def test_unsafe_zip_members_are_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("bottle/ok.txt", "")
        zf.writestr("../evil.txt", "x")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "out").rglob("*"))
    ok = tmp_path / "ok.zip"
    with zipfile.ZipFile(ok, "w") as zf:
        zf.writestr("bottle/train/good/0.png", _png(3))
    safe_extract(ok, tmp_path / "zipped")
    assert (tmp_path / "zipped/bottle/train/good/0.png").is_file()


def test_not_an_archive(tmp_path):
    (tmp_path / "junk.tar.xz").write_bytes(b"<html>moved</html>")
    with pytest.raises(DownloadError, match="neither a tar nor a zip"):
        safe_extract(tmp_path / "junk.tar.xz", tmp_path / "out")
