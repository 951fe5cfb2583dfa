"""nmt translate streams: chunk by chunk, the same output as the whole input at once, pipes answered at once."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_pairs
from typer.testing import CliRunner

from cli.main import app
from nmt.data import InvalidUtf8, decode_lines
from nmt.rundir import load_run
from nmt.translate import read_chunks, translate

runner = CliRunner()


class Pieces(io.RawIOBase):
    """A stream without a file descriptor that hands out its bytes in the pieces given."""

    def __init__(self, *pieces: bytes):
        self.pieces = list(pieces)

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


# --- chunks

def test_chunks_start_small_double_up_to_the_budget_and_keep_every_line() -> None:
    data = "".join(f"line {i}\n" for i in range(700)).encode()
    chunks = list(read_chunks(io.BytesIO(data), chunk_lines=200))
    assert [len(c) for c in chunks] == [16, 32, 64, 128, 200, 200, 60]
    assert [line for c in chunks for line in c] == decode_lines(data, "x")


def test_chunks_read_lines_as_a_whole_file_would() -> None:
    """Lines cut across reads, CRLF, empty lines, a BOM at the start only, no line end at the end."""
    data = "\ufeffone\r\n\n\ufeffthree\nfour".encode()
    pieces = [data[i : i + 3] for i in range(0, len(data), 3)]
    chunks = list(read_chunks(Pieces(*pieces), chunk_lines=2, first=1))
    assert [len(c) for c in chunks] == [1, 2, 1]
    assert [line for c in chunks for line in c] == decode_lines(data, "x") == ["one", "", "\ufeffthree", "four"]


def test_invalid_utf8_in_a_later_chunk_names_its_line_in_the_whole_input() -> None:
    data = b"ok\n" * 99 + b"\xff bad\n"
    with pytest.raises(InvalidUtf8, match=r"<stdin>:100: invalid UTF-8"):
        list(read_chunks(io.BytesIO(data), chunk_lines=7))


def test_a_chunk_is_cut_when_no_more_input_is_waiting() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb", buffering=0) as reader, open(write_end, "wb", buffering=0) as writer:
        writer.write(b"first\nsecond\nthi")  # the pipe stays open: more may come, but not now
        got: list = []
        thread = threading.Thread(target=lambda: got.append(next(read_chunks(reader))), daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert got == [["first", "second"]]  # handed on without waiting for the end of the input


# --- translating in chunks

@pytest.fixture(scope="module")
def source_text() -> str:
    lines = [src for src, _ in make_pairs(40, seed=21)]
    lines[5] = lines[17] = ""
    return "".join(f"{line}\n" for line in lines)


@pytest.fixture(scope="module")
def whole_file(trained_run: Path, source_text: str) -> list[str]:
    """The translations of every line at once, as nmt translate made them before it streamed."""
    cfg, tokenizer, model = load_run(trained_run)
    return [t.texts[0] for t in translate(model, tokenizer, source_text.splitlines(), cfg.search)]


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_streaming_equals_whole_file_translation(trained_run: Path, source_text: str, whole_file: list[str],
                                                 chunk: int) -> None:
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "--chunk-lines", str(chunk)],
                           input=source_text)
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n")[:-1] == whole_file


def test_nbest_lines_are_numbered_in_the_whole_input(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "in.en").write_text("red dog\nsmall tree runs\nbig cat\n", encoding="utf-8")
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "-i", str(tmp_path / "in.en"),
                                 "--beam", "3", "--n-best", "2", "--chunk-lines", "1"])
    assert result.exit_code == 0, result.output
    assert [row.split(" ||| ")[0] for row in result.stdout.splitlines()] == ["0", "0", "1", "1", "2", "2"]


def test_missing_input_file_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "-i", str(tmp_path / "nope.en")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "nope.en: no such file" in result.stderr


def nmt_translate(run: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nmt", "-q", "translate", "-m", str(run), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def test_a_pipe_gets_each_chunk_through_the_file_descriptor(trained_run: Path, source_text: str,
                                                            whole_file: list[str]) -> None:
    job = nmt_translate(trained_run, "--chunk-lines", "7", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    out, err = job.communicate(source_text.encode(), timeout=240)
    assert job.returncode == 0, err.decode()
    assert out.decode().split("\n")[:-1] == whole_file


def read_line(stream, seconds: float) -> bytes | None:
    """One line from a pipe, or None if none came within ``seconds``."""
    deadline, data = time.monotonic() + seconds, b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            return None
        byte = os.read(stream.fileno(), 1)
        if not byte:
            return None
        data += byte
    return data


def test_interactive_pipe_gets_line_one_back_before_line_two_is_written(trained_run: Path) -> None:
    job = nmt_translate(trained_run, "--beam", "1", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL)
    try:
        job.stdin.write(b"red dog\n")
        job.stdin.flush()
        first = read_line(job.stdout, 180)  # the model loads first: a generous bound, not a timing
        assert first is not None and "Hund" in first.decode()
        job.stdin.write(b"big house\n")
        job.stdin.close()
        second = read_line(job.stdout, 180)
        assert second is not None and "Haus" in second.decode()
        assert job.wait(timeout=60) == 0
    finally:
        if job.poll() is None:
            job.kill()


def test_the_ctranslate2_engine_streams_through_the_same_chunks(trained_run: Path, source_text: str,
                                                                tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    from nmt.export import ExportedModel, export_ctranslate2

    export_ctranslate2(trained_run, tmp_path / "ct2")
    engine = ExportedModel(tmp_path / "ct2", threads=1)
    whole = [t.texts[0] for t in engine.translate(source_text.splitlines(), engine.search)]
    result = runner.invoke(app, ["translate", "--engine", "ctranslate2", "-m", str(tmp_path / "ct2"),
                                 "--chunk-lines", "7"], input=source_text)
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n")[:-1] == whole
