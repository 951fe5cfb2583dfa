"""Tests for nmt.download against a local HTTP server: no internet, a few seconds.

The server mirrors the GitHub layout (``data/task1/raw/<name>.gz``) under tmp_path, and
each test injects the checksums of its own fixture files instead of the pinned ones.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nmt.download import LANGS, SPLITS, data_root, download_multi30k, multi30k_files
from nmt.errors import NmtError


@dataclass
class Mirror:
    """A running fake of raw.githubusercontent.com and what it was asked for."""

    url: str
    raw_dir: Path
    requests: list[str] = field(default_factory=list)


def _content(target: str) -> bytes:
    # Distinct per file so a mix-up between splits or languages changes the hash.
    return "".join(f"{target} line {i}\n" for i in range(3)).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checksums(langs: tuple[str, ...] = LANGS) -> dict[str, str]:
    return {target: _sha256(_content(target)) for target in multi30k_files(langs)}


def _publish(raw_dir: Path) -> None:
    raw_dir.mkdir(parents=True)
    for target, upstream in multi30k_files().items():
        (raw_dir / f"{upstream}.gz").write_bytes(gzip.compress(_content(target)))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would intercept requests to 127.0.0.1.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv("NMT_MULTI30K_URL", raising=False)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "server"
    raw_dir = root / "data" / "task1" / "raw"
    _publish(raw_dir)
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest output clean

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    # A short poll interval makes shutdown() return at once instead of after 0.5 s.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_address[1]}", raw_dir, seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _download(
    mirror: Mirror,
    dest: Path,
    langs: tuple[str, ...] = LANGS,
    checksums: dict[str, str] | None = None,
) -> Path:
    table = _checksums() if checksums is None else checksums
    return download_multi30k(
        dest, base_url=mirror.url, langs=langs, progress=False, checksums=table
    )


def test_downloads_all_files(mirror: Mirror, tmp_path: Path) -> None:
    out = _download(mirror, tmp_path / "data")
    assert out == tmp_path / "data" / "multi30k"
    expected = multi30k_files()
    assert len(expected) == 12
    assert _leftovers(out) == sorted(expected)
    for target in expected:
        assert (out / target).read_bytes() == _content(target)


def test_langs_subset(mirror: Mirror, tmp_path: Path) -> None:
    out = _download(mirror, tmp_path, langs=("en", "de"))
    names = sorted(
        f"{split}.{lang}" for split in SPLITS.values() for lang in ("de", "en")
    )
    assert _leftovers(out) == names
    assert len(mirror.requests) == 6


def test_second_call_downloads_nothing(mirror: Mirror, tmp_path: Path) -> None:
    _download(mirror, tmp_path)
    first = len(mirror.requests)
    _download(mirror, tmp_path)
    assert first == 12
    assert len(mirror.requests) == first


def test_file_with_wrong_hash_is_fetched_again(mirror: Mirror, tmp_path: Path) -> None:
    out = _download(mirror, tmp_path)
    (out / "train.en").write_text("damaged\n")
    mirror.requests.clear()
    _download(mirror, tmp_path)
    assert mirror.requests == ["/data/task1/raw/train.en.gz"]
    assert (out / "train.en").read_bytes() == _content("train.en")


def test_bad_checksum_leaves_nothing(mirror: Mirror, tmp_path: Path) -> None:
    checksums = _checksums(("en",)) | {"valid.en": "0" * 64}
    with pytest.raises(NmtError, match="valid.en") as info:
        _download(mirror, tmp_path, langs=("en",), checksums=checksums)
    message = str(info.value)
    assert "0" * 64 in message and _sha256(_content("valid.en")) in message
    # train.en came first and was verified; nothing of valid.en may remain.
    assert _leftovers(tmp_path / "multi30k") == ["train.en"]


def test_http_404_names_url(mirror: Mirror, tmp_path: Path) -> None:
    (mirror.raw_dir / "val.de.gz").unlink()
    with pytest.raises(NmtError, match=r"/data/task1/raw/val\.de\.gz.*NMT_DATA"):
        _download(mirror, tmp_path, langs=("de",))
    assert _leftovers(tmp_path / "multi30k") == ["train.de"]


def test_connection_refused(tmp_path: Path) -> None:
    # Bind then close to get a port that nobody listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(NmtError, match=f"{url}/data/task1/raw/train.en.gz"):
        download_multi30k(
            tmp_path,
            base_url=url,
            langs=("en",),
            progress=False,
            checksums=_checksums(),
        )
    assert _leftovers(tmp_path / "multi30k") == []


def _garbage(packed: bytes) -> bytes:
    return b"this is not gzip\n"


def _truncated(packed: bytes) -> bytes:
    return packed[: len(packed) // 2]  # a real gzip header, cut off mid-stream


@pytest.mark.parametrize("corrupt", [_garbage, _truncated])
def test_corrupt_gzip_leaves_nothing(
    mirror: Mirror, tmp_path: Path, corrupt: Callable[[bytes], bytes]
) -> None:
    packed = gzip.compress(_content("train.fr"))
    (mirror.raw_dir / "train.fr.gz").write_bytes(corrupt(packed))
    with pytest.raises(NmtError, match="train.fr.gz"):
        _download(mirror, tmp_path, langs=("fr",))
    assert _leftovers(tmp_path / "multi30k") == []


def test_env_overrides(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NMT_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("NMT_MULTI30K_URL", mirror.url + "/")
    assert data_root() == tmp_path / "env-data"
    out = download_multi30k(langs=("cs",), progress=False, checksums=_checksums())
    assert out == tmp_path / "env-data" / "multi30k"
    assert (out / "test2016.cs").read_bytes() == _content("test2016.cs")


def test_data_root_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NMT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root() == tmp_path / ".cache" / "nmt" / "data"


def test_unknown_language(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="xx"):
        download_multi30k(tmp_path, langs=("xx",), progress=False)
