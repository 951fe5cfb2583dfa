"""Fetch the Multi30k task-1 corpus from a pinned commit and verify every file.

The raw files live in the GitHub repository ``multi30k/dataset``. We pin a commit so
the bytes cannot change under us, and pin the sha256 of the *unpacked* files because
that is what training reads. Each file is streamed to a temp file next to its
destination and only moved into place once it has been unpacked and verified, so an
interrupted or failed run never leaves a file that looks finished.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from nmt.errors import NmtError
from nmt.files import sha256

MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
MULTI30K_URL = f"https://raw.githubusercontent.com/multi30k/dataset/{MULTI30K_COMMIT}"
LANGS: tuple[str, ...] = ("en", "de", "fr", "cs")

# Upstream split name -> our name; "valid"/"test2016" are what the rest of nmt expects.
SPLITS: dict[str, str] = {
    "train": "train",
    "val": "valid",
    "test_2016_flickr": "test2016",
}

# sha256 of the gunzipped files, keyed by destination file name.
CHECKSUMS: dict[str, str] = {
    "test2016.cs": "45adb85f688de8407fddcbe1b36dca15d12aab868149b337e2576f2d6d2ff8d8",
    "test2016.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test2016.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    "test2016.fr": "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6",
    "train.cs": "2be68b38c8d586ff4f54eb13cc6e1baaaa053695b3f070d3038303a47f2268da",
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "train.fr": "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d",
    "valid.cs": "d53827e469b0a1ca8d57e9e26b2b64c4bc4b33f5479c7b03ae87ae5c882c3e33",
    "valid.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "valid.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "valid.fr": "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
}

TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 16


def data_root() -> Path:
    """Directory that holds all downloaded corpora: ``$NMT_DATA`` or ``~/.cache/nmt/data``."""
    env = os.environ.get("NMT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "nmt" / "data"


def multi30k_files(langs: Sequence[str] = LANGS) -> dict[str, str]:
    """Map each destination file name (``valid.de``) to its upstream name (``val.de``)."""
    unknown = [lang for lang in langs if lang not in LANGS]
    if unknown:
        raise NmtError(
            f"unknown Multi30k language(s) {', '.join(unknown)}; "
            f"choose from {', '.join(LANGS)}"
        )
    return {
        f"{ours}.{lang}": f"{upstream}.{lang}"
        for upstream, ours in SPLITS.items()
        for lang in langs
    }


def download_multi30k(
    dest: Path | None = None,
    base_url: str | None = None,
    langs: Sequence[str] = LANGS,
    progress: bool = True,
    checksums: dict[str, str] | None = None,
) -> Path:
    """Download, unpack and verify Multi30k task 1; return the ``multi30k`` directory.

    Files already present with the pinned sha256 are kept, so calling this again is
    cheap. ``base_url`` (or ``$NMT_MULTI30K_URL``) replaces the GitHub URL up to the
    ``data/task1/raw`` part; ``checksums`` replaces the pinned table.
    """
    directory = (dest if dest is not None else data_root()) / "multi30k"
    base = _resolve_base_url(base_url)
    table = CHECKSUMS if checksums is None else checksums
    files = multi30k_files(langs)
    directory.mkdir(parents=True, exist_ok=True)
    for target, upstream in files.items():
        expected = _expected_sha256(table, target)
        path = directory / target
        if path.is_file() and sha256(path) == expected:
            continue
        url = f"{base}/data/task1/raw/{upstream}.gz"
        _fetch_verified(url, path, expected, progress)
    return directory


def _resolve_base_url(base_url: str | None) -> str:
    base = base_url or os.environ.get("NMT_MULTI30K_URL") or MULTI30K_URL
    return base.rstrip("/")


def _expected_sha256(table: dict[str, str], target: str) -> str:
    try:
        return table[target]
    except KeyError:
        raise NmtError(
            f"no sha256 pinned for Multi30k file {target}; "
            "add it to the checksum table or drop that language"
        ) from None


def _fetch_verified(url: str, path: Path, expected: str, progress: bool) -> None:
    """Download ``url`` (gzip), unpack, check sha256, then atomically move to ``path``."""
    # Temp files in the destination directory so os.replace stays a same-filesystem rename.
    packed = _temp_path(path, ".gz.part")
    unpacked = _temp_path(path, ".part")
    try:
        _download(url, packed, progress)
        actual = _gunzip(packed, unpacked, url)
        if actual != expected:
            raise NmtError(
                f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
                f"the download from {url} is corrupt or changed upstream, retry or report it"
            )
        os.replace(unpacked, path)
    finally:
        for tmp in (packed, unpacked):
            tmp.unlink(missing_ok=True)


def _temp_path(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _download(url: str, out: Path, progress: bool) -> None:
    with _open_url(url) as response, out.open("wb") as sink:
        total = response.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total and total.isdigit() else None,
            unit="B",
            unit_scale=True,
            desc=url.rsplit("/", 1)[-1],
            file=sys.stderr,
            disable=not progress,
            leave=False,
        ) as bar:
            for chunk in _read_chunks(response, url):
                sink.write(chunk)
                bar.update(len(chunk))


def _network_error(url: str, err: BaseException) -> NmtError:
    reason = getattr(err, "reason", None) or err
    return NmtError(
        f"could not download {url}: {reason}; check the internet connection, "
        "or set NMT_DATA to a directory that already holds multi30k/"
    )


def _open_url(url: str) -> http.client.HTTPResponse:
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()  # the error carries an open response body
        raise _network_error(url, err) from None
    except (OSError, http.client.HTTPException) as err:
        # URLError, timeouts and refused connections are all OSError subclasses.
        raise _network_error(url, err) from None


def _read_chunks(response: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
    # Only reads are guarded: a disk error while writing must not look like a network one.
    while True:
        try:
            chunk = response.read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as err:
            raise _network_error(url, err) from None
        if not chunk:
            return
        yield chunk


def _gunzip(packed: Path, out: Path, url: str) -> str:
    """Unpack ``packed`` into ``out`` and return the sha256 of the unpacked bytes."""
    digest = hashlib.sha256()
    try:
        with gzip.open(packed, "rb") as source, out.open("wb") as sink:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
                sink.write(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise NmtError(
            f"download from {url} is not a valid gzip file ({err}); "
            "retry, or report it if it keeps failing"
        ) from None
    return digest.hexdigest()
