"""nmt serve: LibreTranslate's clients and OpenNMT-py's route against a real server on localhost,
translations equal to nmt translate's, batching across requests, and bad input answered."""

from __future__ import annotations

import dataclasses
import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import make_pairs  # noqa: E402
from serving import InThread, Served  # noqa: E402

from nmt.rundir import load_run  # noqa: E402
from nmt.serve.text import document  # noqa: E402
from nmt.translate import translate  # noqa: E402

SENTENCES = [src for src, _ in make_pairs(120, seed=31)]


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    served = Served(tmp, "-m", str(trained_run), "--char-limit", "400", "--batch-limit", "60",
                    "--body-limit", "8192", "--max-wait-ms", "20")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def reference(trained_run: Path):
    """What nmt translate gives: the best translation of each line, and the 3-best lists."""
    cfg, tokenizer, model = load_run(trained_run, int8=False)
    search = dataclasses.replace(cfg.search, sampling="none")

    def best(lines: list[str], n_best: int = 1) -> list[list[str]]:
        return [t.texts for t in translate(model, tokenizer, lines, dataclasses.replace(search, n_best=n_best))]

    return best


# --- text: what is translated, and what is kept

def test_paragraph_is_cut_into_sentences_and_rebuilt_with_its_breaks() -> None:
    doc = document("A dog runs. Two cats sleep!\n\n  Dr. Smith has a big house.  ", "en", "text")
    assert doc.sources == ["A dog runs.", "Two cats sleep!", "Dr. Smith has a big house."]
    assert doc.rebuild(["1", "2", "3"]) == "1 2\n\n  3  "


def test_html_keeps_markup_and_skips_code_and_translate_no() -> None:
    doc = document('<p class="x">one &amp; two <b>dog</b></p><script>a < b</script>'
                   '<span translate="no">keep <i>this</i></span><br/>@ ·<br>end', "en", "html")
    assert doc.sources == ["one & two", "dog", "end"]
    assert doc.rebuild(["eins & zwei", "Hund", "Ende"]) == (
        '<p class="x">eins &amp; zwei <b>Hund</b></p><script>a < b</script>'
        '<span translate="no">keep <i>this</i></span><br/>@ ·<br>Ende')


# --- LibreTranslate's API

def test_libretranslatepy_client_gets_nmt_translate_output(server, reference) -> None:
    from libretranslatepy import LibreTranslateAPI

    client = LibreTranslateAPI(server.url)
    lines = SENTENCES[:5]
    assert [client.translate(line, "en", "de") for line in lines] == [t[0] for t in reference(lines)]
    assert client.detect(lines[0]) == [{"confidence": 100.0, "language": "en"}]
    assert client.languages() == [{"code": "de", "name": "German", "targets": []},
                                  {"code": "en", "name": "English", "targets": ["de"]}]


def test_json_form_and_query_string_give_the_same_answers(server, reference) -> None:
    lines = SENTENCES[5:9]
    want = [t[0] for t in reference(lines)]
    status, answer = server.post_json("/translate", {"q": lines, "source": "en", "target": "de"})
    assert status == 200 and answer == {"translatedText": want}
    from urllib.parse import urlencode

    form = urlencode([("q", line) for line in lines] + [("source", "en"), ("target", "de")], doseq=True)
    status, answer = server.request("POST", "/translate", form.encode(),
                                    {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and answer == {"translatedText": want}
    status, answer = server.request("POST", "/translate?" + urlencode({"q": lines[0], "source": "en",
                                                                       "target": "de"}))
    assert status == 200 and answer == {"translatedText": want[0]}
    boundary = "nmtboundary"
    multipart = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                        for k, v in [("q", lines[1]), ("source", "en"), ("target", "de")]) + f"--{boundary}--\r\n"
    status, answer = server.request("POST", "/translate", multipart.encode(),
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and answer == {"translatedText": want[1]}


def test_alternatives_come_from_the_n_best_list_and_are_capped(server, reference) -> None:
    line = SENTENCES[10]
    nbest = reference([line], n_best=3)[0]
    status, answer = server.post_json("/translate", {"q": line, "source": "en", "target": "de", "alternatives": 2})
    assert status == 200 and answer == {"translatedText": nbest[0], "alternatives": nbest[1:3]}
    # The recipe's beam is 3: at most 2 alternatives, whatever is asked.
    status, answer = server.post_json("/translate", {"q": [line], "source": "en", "target": "de",
                                                     "alternatives": 9})
    assert status == 200 and answer["alternatives"] == [nbest[1:3]]


def test_mastodon_like_request_html_auto_and_a_list(server, reference) -> None:
    """Mastodon sends format html, source auto, q as a list, and reads detectedLanguage[i]."""
    a, b = SENTENCES[11], SENTENCES[12]
    status, answer = server.post_json("/translate", {"q": [f"<p>{a}</p>", f"<p>{b}<br>{a}</p>"],
                                                     "source": "auto", "target": "de", "format": "html"})
    ta, tb = (t[0] for t in reference([a, b]))
    assert status == 200
    assert answer["translatedText"] == [f"<p>{ta}</p>", f"<p>{tb}<br>{ta}</p>"]
    assert answer["detectedLanguage"] == [{"confidence": 100.0, "language": "en"}] * 2


def test_three_sentence_paragraph_is_translated_sentence_by_sentence(server, reference) -> None:
    sentences = ["One red dog runs.", "Two cats sleep!", "A big green house?"]
    status, answer = server.post_json("/translate", {"q": "  ".join(sentences[:2]) + "\n" + sentences[2],
                                                     "source": "en", "target": "de"})
    t = [x[0] for x in reference(sentences)]
    assert status == 200 and answer["translatedText"] == f"{t[0]}  {t[1]}\n{t[2]}"


def test_health_and_docs(server) -> None:
    assert server.get("/health")["status"] == "ok"
    assert "/translate" in server.get("/openapi.json")["paths"]


# --- OpenNMT-py's route

def test_opennmt_route_shape_and_content(server, reference) -> None:
    lines = SENTENCES[13:16]
    status, answer = server.post_json("/translator/translate", [{"src": line, "id": 0} for line in lines])
    assert status == 200 and len(answer) == 1  # n_best lists: the recipe's n_best is 1
    assert [r["tgt"] for r in answer[0]] == [t[0] for t in reference(lines)]
    assert all(r["src"] == line and r["n_best"] == 1 and isinstance(r["pred_score"], float)
               for r, line in zip(answer[0], lines))
    assert server.get("/translator/models")[0]["model_id"] == 0
    status, answer = server.post_json("/translator/translate", [{"src": "dog", "id": 7}])
    assert status == 400 and "no model with id 7" in answer["error"] and answer["status"] == "error"


# --- batching across requests

def test_sentence_alone_and_among_50_concurrent_requests_is_the_same(server, reference) -> None:
    target = SENTENCES[20]
    status, alone = server.post_json("/translate", {"q": target, "source": "en", "target": "de"})
    assert status == 200 and alone["translatedText"] == reference([target])[0][0]
    before = server.get("/health")
    others = SENTENCES[21:70]

    def send(line):
        return server.post_json("/translate", {"q": line, "source": "en", "target": "de"})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(send, [target] + others))
    assert all(status == 200 for status, _ in answers)
    assert answers[0][1] == alone
    assert [a["translatedText"] for _, a in answers[1:]] == [t[0] for t in reference(others)]
    after = server.get("/health")
    batches, requests = after["batches"] - before["batches"], after["requests"] - before["requests"]
    assert requests == 50 and batches < requests  # requests were decoded together


# --- bad input: one JSON error and one log line each, nothing on stdout, the server goes on

BAD = [
    ("missing q", {"source": "en", "target": "de"}, 400, "missing q"),
    ("empty q", {"q": "", "source": "en", "target": "de"}, 400, "missing q"),
    ("list over --batch-limit", {"q": ["dog"] * 61, "source": "en", "target": "de"}, 400, "text limit"),
    ("over --char-limit", {"q": "dog " * 101, "source": "en", "target": "de"}, 400, "character limit"),
    ("unknown pair", {"q": "dog", "source": "en", "target": "fr"}, 400, "en->fr is not served"),
    ("bad format", {"q": "dog", "source": "en", "target": "de", "format": "pdf"}, 400, "format"),
]


def _check_answered_after(server, count_before: int, status: int, answer, code: int, words: str) -> None:
    assert status == code and words in answer["error"], answer
    lines = server.log_lines()[count_before:]
    assert len(lines) == 1 and str(code) in lines[0] and "Traceback" not in lines[0], lines
    good = server.post_json("/translate", {"q": "dog", "source": "en", "target": "de"})
    assert good[0] == 200


@pytest.mark.parametrize("name, payload, code, words", BAD, ids=[b[0] for b in BAD])
def test_bad_json_request(server, name, payload, code, words) -> None:
    before = len(server.log_lines())
    status, answer = server.post_json("/translate", payload)
    _check_answered_after(server, before, status, answer, code, words)


RAW = [
    ("invalid JSON", b'{"q": "dog",', "application/json", 400, "invalid JSON"),
    ("wrong content type", b"<q>dog</q>", "application/xml", 415, "content type"),
    ("not UTF-8", b'{"q": "\xff\xfe dog", "source": "en", "target": "de"}', "application/json", 400, "not UTF-8"),
    ("over --body-limit", b'{"q": "' + b"x" * 9000 + b'"}', "application/json", 413, "--body-limit"),
]


@pytest.mark.parametrize("name, body, kind, code, words", RAW, ids=[r[0] for r in RAW])
def test_bad_raw_request(server, name, body, kind, code, words) -> None:
    before = len(server.log_lines())
    status, answer = server.request("POST", "/translate", body, {"Content-Type": kind})
    _check_answered_after(server, before, status, answer, code, words)


def test_chunked_body_over_the_limit_is_refused_as_it_streams(server) -> None:
    before = len(server.log_lines())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b'{"q": "' if i == 0 else b"x" * 1000 for i in range(20))
    conn.request("POST", "/translate", body=chunks, headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    _check_answered_after(server, before, status, answer, 413, "--body-limit")


def test_client_that_disconnects_mid_body_or_mid_translation(server) -> None:
    before = len(server.log_lines())
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # promises 100 bytes, sends 10
        s.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n" + b'{"q": "dog')
    body = json.dumps({"q": SENTENCES[:10], "source": "en", "target": "de"}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # sends it all, leaves at once
        s.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.5)
    assert server.post_json("/translate", {"q": "dog", "source": "en", "target": "de"})[0] == 200
    assert server.process.poll() is None
    # One line for the body cut short; the request that left while decoding was translated, its
    # answer dropped, nothing to report.
    assert [line.split(": ", 2)[1] for line in server.log_lines()[before:]] == ["400 POST /translate"]


def test_stdout_stays_empty(server) -> None:
    assert server.out.read_text() == ""


def test_api_keys_timeout_and_a_full_queue(trained_run, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nsecret-1\nsecret-2\n")
    # Each request waits 1.5 s for company but may take 0.7 s: every one times out; one waits at most.
    served = Served(tmp_path, "-m", str(trained_run), "--api-keys", str(keys), "--max-wait-ms", "1500",
                    "--timeout", "0.7", "--max-queue", "1")
    try:
        status, answer = served.post_json("/translate", {"q": "dog", "source": "en", "target": "de",
                                                         "api_key": "wrong"})
        assert status == 403 and answer == {"error": "Invalid API key"}
        status, answer = served.post_json("/translate", {"q": "dog", "source": "en", "target": "de"})
        assert status == 403 and "api_key" in answer["error"]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(served.post_json, "/translate", {"q": "dog", "source": "en", "target": "de",
                                                                 "api_key": "secret-2"})
            time.sleep(0.3)
            second = served.post_json("/translate", {"q": "cat", "source": "en", "target": "de",
                                                     "api_key": "secret-1"})
            assert second[0] == 503 and "--max-queue" in second[1]["error"]
            assert first.result()[0] == 504 and "--timeout" in first.result()[1]["error"]
        status, answer = served.request("GET", "/languages")
        assert status == 200  # no key needed to list languages
    finally:
        assert served.stop() == 0
    assert served.out.read_text() == ""


def test_sigterm_finishes_the_request_in_flight_and_exits_0(trained_run, tmp_path) -> None:
    served = Served(tmp_path, "-m", str(trained_run), "--max-wait-ms", "1000")
    result = {}

    def send():
        result["answer"] = served.post_json("/translate", {"q": SENTENCES[:5], "source": "en", "target": "de"})

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.4)  # the request waits in the batcher for company
    served.process.send_signal(signal.SIGTERM)
    sender.join(30)
    assert result["answer"][0] == 200 and len(result["answer"][1]["translatedText"]) == 5
    assert served.stop() == 0
    with pytest.raises(OSError):
        served.get("/health")


def test_two_runs_for_one_pair_are_refused(trained_run, tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "nmt", "serve", "-m", str(trained_run), "-m", str(trained_run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "both translate en->de" in done.stderr and "Traceback" not in done.stderr


def test_ctranslate2_export_is_served_as_it_translates(trained_run, tmp_path) -> None:
    """An export decoded by CTranslate2 answers what nmt translate --engine ctranslate2 gives."""
    pytest.importorskip("ctranslate2")
    from nmt.export import ExportedModel, export_ctranslate2

    out = tmp_path / "ct2"
    export_ctranslate2(trained_run, out)
    engine = ExportedModel(out, threads=1)
    lines = SENTENCES[:6]
    want = [t.texts[0] for t in engine.translate(lines, engine.search)]
    served = Served(tmp_path, "-m", str(out), "--engine", "ctranslate2")
    try:
        status, answer = served.post_json("/translate", {"q": lines, "source": "en", "target": "de"})
        assert status == 200 and answer["translatedText"] == want
        assert served.get("/translator/models")[0]["kind"] == "ctranslate2"
    finally:
        assert served.stop() == 0


# --- several language pairs, without a trained model: routes over stand-in models

class _Words:
    def encode(self, lines):
        return [line.split() for line in lines]


def _stand_in(i: int, source: str, target: str):
    from nmt.config import SearchConfig
    from nmt.search import Hypothesis
    from nmt.serve.models import ServedModel
    from nmt.translate import Translation

    def decode(lines, cfg, source_name="request"):
        return [Translation(n, [f"{target}:{line}"] * cfg.n_best, [Hypothesis([], -1.0, -1.0)] * cfg.n_best)
                for n, line in enumerate(lines)]

    return ServedModel(i, Path(f"run-{source}-{target}"), source, target, "transformer", SearchConfig(beam=4),
                       _Words(), decode)


def test_several_pairs_route_by_language_and_refuse_auto() -> None:
    from nmt.serve.app import ServeLimits, Server, build_app
    from nmt.serve.batcher import Limits

    server = Server([_stand_in(0, "en", "de"), _stand_in(1, "fr", "de"), _stand_in(2, "en", "fr")], ServeLimits(),
                    Limits())
    with InThread(build_app(server)) as client:
        languages = client.get("/languages")
        assert {lang["code"]: lang["targets"] for lang in languages} == {"de": [], "en": ["de", "fr"], "fr": ["de"]}
        answer = client.post_json("/translate", {"q": ["a b", "c"], "source": "fr", "target": "de"})
        assert answer == (200, {"translatedText": ["de:a b", "de:c"]})
        answer = client.post_json("/translate", {"q": "a", "source": "en", "target": "fr"})
        assert answer == (200, {"translatedText": "fr:a"})
        for path in ("/translate", "/detect"):
            status, answer = client.post_json(path, {"q": "a", "source": "auto", "target": "de"})
            assert status == 400 and "detects no language" in answer["error"]
        status, answer = client.post_json("/translator/translate", [{"src": "x", "id": 1}, {"src": "y", "id": 2}])
        assert [r["tgt"] for r in answer[0]] == ["de:x", "fr:y"]
        status, answer = client.post_json("/translator/translate", [{"src": "x"}])
        assert status == 400 and "no model with id None" in answer["error"]
        # Preflight and simple requests from a page on another origin, as LibreTranslate answers them.
        status, headers, _ = client.exchange("OPTIONS", "/translate", headers={
            "Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        status, headers, _ = client.exchange("GET", "/languages", headers={"Origin": "https://example.org"})
        assert headers["access-control-allow-origin"] == "*"
