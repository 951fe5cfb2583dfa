"""The HTTP routes: LibreTranslate's API, OpenNMT-py's route and a page to try them.

LibreTranslate (what libretranslatepy, deep-translator, Mastodon and others speak):

* ``POST /translate``: ``q`` (a string or a list), ``source`` (a code, or ``auto``),
  ``target``, ``format`` (``text`` or ``html``), ``alternatives`` (a count), ``api_key``;
  read from a JSON body, a form body (urlencoded or multipart) or the query string.
  Answers ``{"translatedText": ...}``, a string for a string ``q`` and a list of the same
  length for a list, with ``alternatives`` (from the n-best list) when asked for and
  ``detectedLanguage`` when ``source`` was ``auto``.
* ``POST /detect``, ``GET /languages``, ``GET /health``, ``GET /frontend/settings``.
* Errors are ``{"error": message}`` with 400 (bad request), 403 (API key), 404, 405, 413
  (body over ``--body-limit``), 415 (content type), 500, 503 (busy or shutting down) or
  504 (``--timeout``), each logged as one line.

nmt detects no language: ``source=auto`` and ``/detect`` answer with the one source
language the server translates from (confidence 100: no other can be translated here) and
are refused with a 400 when it serves several.

OpenNMT-py: ``POST /translator/translate`` takes ``[{"src": text, "id": model_id}, ...]``
and answers n-best lists, ``out[k][i] = {"src", "tgt", "n_best", "pred_score"}`` for the
k-th best of input i; ``GET /translator/models`` lists the model ids (the ``-m`` order, from 0).

Every text is cut into sentences (``nmt.serve.text``) and the sentences of concurrent
requests are decoded together (``nmt.serve.batcher``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nmt.errors import NmtError
from nmt.serve.batcher import Batcher, Limits, Refused
from nmt.serve.models import ServedModel
from nmt.serve.text import Document, document

log = logging.getLogger("nmt")

LANGUAGE_NAMES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fi": "Finnish",
    "fr": "French", "hi": "Hindi", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "tr": "Turkish",
    "uk": "Ukrainian", "zh": "Chinese",
}
FORMATS = ("text", "html")


@dataclass
class ServeLimits:
    char_limit: int = 5000  # characters in all of a request's texts; 0 or less: none
    batch_limit: int = 100  # texts in one request's q list; 0 or less: none
    body_limit: int = 1 << 20  # bytes of a request body, counted as they arrive
    max_alternatives: int = 3  # alternatives a request may ask for (also at most beam - 1)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_api_keys(path: Path) -> list[bytes]:
    """One key a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise NmtError(f"{path}: cannot read the API keys ({e}); give a text file with one key a line") from None
    keys = [line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise NmtError(f"{path}: holds no API key; put one key a line")
    return keys


# --- reading a request's parameters --------------------------------------------------------

async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as more than ``limit`` bytes have come, chunked or not."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the server's {limit} (--body-limit)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over the server's {limit} bytes (--body-limit)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, f"the client closed the connection after {size} bytes of the body") from None
    return b"".join(chunks)


def _utf8(body: bytes, what: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the {what} body is not UTF-8 (byte {e.start}); send UTF-8 text") from None


def _multi(pairs) -> dict:
    """Form or query pairs as a dict; a key given more than once holds a list."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


async def _form(request: Request, body: bytes) -> dict:
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form()
    return _multi((k, v) for k, v in form.multi_items() if isinstance(v, str))


async def read_json(request: Request, limit: int):
    body = await _body(request, limit)
    try:
        return json.loads(_utf8(body, "JSON"))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


async def read_params(request: Request, limit: int) -> dict:
    """The query string's parameters, with a JSON or form body's over them."""
    params = _multi(request.query_params.multi_items())
    body = await _body(request, limit)
    if not body.strip():
        return params
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json") or (kind in ("", "text/plain")
                                                               and body.lstrip()[:1] == b"{"):
        try:
            found = json.loads(_utf8(body, "JSON"))
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(found, dict):
            raise ApiError(400, "the JSON body must be an object such as {\"q\": \"text\", \"source\": \"en\", "
                                "\"target\": \"de\"}")
        return {**params, **found}
    if kind == "application/x-www-form-urlencoded":
        return {**params, **_multi(parse_qsl(_utf8(body, "form"), keep_blank_values=True))}
    if kind == "multipart/form-data":
        _utf8(body, "form")
        return {**params, **await _form(request, body)}
    raise ApiError(415, f"content type {kind or '(none)'} is not read; send JSON (application/json) or a "
                        "form (application/x-www-form-urlencoded or multipart/form-data)")


# --- the server ----------------------------------------------------------------------------

class Server:
    """The models, the limits, the API keys and the batcher behind the routes."""

    def __init__(self, models: list[ServedModel], limits: ServeLimits, batcher_limits: Limits,
                 api_keys: list[bytes] | None = None):
        self.models = models
        self.limits = limits
        self.batcher = Batcher(batcher_limits)
        self.api_keys = api_keys

    @property
    def sources(self) -> list[str]:
        return sorted({m.source for m in self.models})

    def check_key(self, given) -> None:
        if self.api_keys is None:
            return
        given = (given if isinstance(given, str) else "").encode()
        found = False
        for key in self.api_keys:  # every key compared, each in constant time
            found |= hmac.compare_digest(key, given)
        if not found:
            raise ApiError(403, "Invalid API key" if given else "an API key is required (api_key)")

    def auto_source(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0]
        raise ApiError(400, f"source=auto: nmt detects no language and this server translates from "
                            f"{', '.join(self.sources)}; give source")

    def model(self, source: str, target: str) -> ServedModel:
        for m in self.models:
            if m.pair == (source, target):
                return m
        pairs = ", ".join(f"{m.source}->{m.target}" for m in self.models)
        raise ApiError(400, f"{source}->{target} is not served here (this server translates {pairs}); "
                            "see GET /languages")

    def languages(self) -> list[dict]:
        codes = sorted({m.source for m in self.models} | {m.target for m in self.models})
        return [{"code": c, "name": LANGUAGE_NAMES.get(c, c),
                 "targets": sorted(m.target for m in self.models if m.source == c)} for c in codes]

    async def translate_texts(self, model: ServedModel, texts: list[str], format: str,
                              alternatives: int) -> list[list[tuple[str, float]]]:
        """Each text's n-best (text, score), best first, ``alternatives + 1`` of them; a text cut
        into sentences scores the sum of its sentences' scores."""
        docs: list[Document] = [document(t, model.source, format) for t in texts]
        segments = [s for d in docs for s in d.sources]
        cfg = dataclasses.replace(model.search, n_best=alternatives + 1)
        translations = await self.batcher.translate(model, cfg, segments)
        out, start = [], 0
        for d in docs:
            mine = translations[start: start + len(d.segments)]
            start += len(d.segments)
            nbest = []
            for k in range(alternatives + 1):
                texts_k = [t.texts[k] or t.texts[0] for t in mine]
                score = sum((t.hypotheses[min(k, len(t.hypotheses) - 1)].score if t.hypotheses else 0.0)
                            for t in mine)
                nbest.append((d.rebuild(texts_k), score))
            out.append(nbest)
        return out


def _count(value, name: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a whole number, got {value!r}") from None


def build_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        await server.batcher.close()

    app = FastAPI(title="nmt", summary="Neural machine translation: LibreTranslate's API and OpenNMT-py's route",
                  lifespan=lifespan)
    app.router.route_class = _OneLineErrors
    # As LibreTranslate: any origin may call the API from a page.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    def error(request: Request, code: int, message: str, **more) -> JSONResponse:
        log.warning("%d %s %s: %s", code, request.method, request.url.path, message)
        return JSONResponse({"error": message, **more}, status_code=code)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        more = {"status": "error"} if request.url.path.startswith("/translator/") else {}
        return error(request, e.status, str(e), **more)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        response = error(request, e.status, str(e))
        if e.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(request, e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error(request, 400, f"invalid request: {e.errors()}")

    limits = server.limits

    @app.post("/translate", summary="Translate text (LibreTranslate's API)")
    async def translate(request: Request):
        p = await read_params(request, limits.body_limit)
        server.check_key(p.get("api_key"))
        q = p.get("q")
        if q is None or q == "" or q == []:
            raise ApiError(400, "Invalid request: missing q parameter")
        texts = q if isinstance(q, list) else [q]
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "Invalid request: q must be a string or a list of strings")
        if limits.batch_limit > 0 and len(texts) > limits.batch_limit:
            raise ApiError(400, f"Invalid request: request ({len(texts)}) exceeds text limit "
                                f"({limits.batch_limit}, --batch-limit)")
        chars = sum(len(t) for t in texts)
        if limits.char_limit > 0 and chars > limits.char_limit:
            raise ApiError(400, f"Invalid request: request ({chars}) exceeds character limit "
                                f"({limits.char_limit}, --char-limit)")
        source, target = p.get("source"), p.get("target")
        if not source or not target:
            raise ApiError(400, f"Invalid request: missing {'source' if not source else 'target'} parameter")
        format = p.get("format") or "text"
        if format not in FORMATS:
            raise ApiError(400, f"Invalid request: format {format!r}: give text or html")
        detected = source == "auto"
        model = server.model(server.auto_source() if detected else source, target)
        alternatives = _count(p.get("alternatives"), "alternatives", 0)
        if alternatives < 0:
            raise ApiError(400, f"alternatives must be 0 or more, got {alternatives}")
        alternatives = min(alternatives, limits.max_alternatives, model.search.beam - 1)
        nbest = await server.translate_texts(model, texts, format, alternatives)
        best = [n[0][0] for n in nbest]
        found = {"confidence": 100.0, "language": model.source}
        one = not isinstance(q, list)
        answer: dict = {"translatedText": best[0] if one else best}
        if detected:
            answer["detectedLanguage"] = found if one else [found] * len(texts)
        if p.get("alternatives") not in (None, ""):
            alts = [[text for text, _ in n[1:]] for n in nbest]
            answer["alternatives"] = alts[0] if one else alts
        return answer

    @app.post("/detect", summary="The source language (LibreTranslate's API; nmt detects none)")
    async def detect(request: Request):
        p = await read_params(request, limits.body_limit)
        server.check_key(p.get("api_key"))
        if p.get("q") in (None, "", []):
            raise ApiError(400, "Invalid request: missing q parameter")
        return [{"confidence": 100.0, "language": server.auto_source()}]

    @app.get("/languages", summary="The languages served and their targets (LibreTranslate's API)")
    async def languages():
        return server.languages()

    @app.get("/health", summary="200 while the server is up, with the batches decoded so far")
    async def health():
        stats = server.batcher.stats
        return {"status": "ok", "batches": stats.batches, "requests": stats.requests, "segments": stats.segments,
                "waiting": server.batcher.pending}

    @app.get("/frontend/settings", summary="What the page needs to know (LibreTranslate's API)")
    async def settings():
        langs = server.languages()
        first = server.models[0]
        return {"charLimit": limits.char_limit, "keyRequired": server.api_keys is not None,
                "suggestions": False, "filesTranslation": False, "supportedFilesFormat": [],
                "maxAlternatives": limits.max_alternatives,
                "language": {"source": {"code": first.source, "name": LANGUAGE_NAMES.get(first.source, first.source)},
                             "target": {"code": first.target, "name": LANGUAGE_NAMES.get(first.target, first.target)}},
                "languages": langs}

    @app.post("/translator/translate", summary="Translate (OpenNMT-py's route): [{\"src\": text, \"id\": model}]")
    async def opennmt_translate(request: Request):
        server.check_key(request.query_params.get("api_key") or _bearer(request))
        items = await read_json(request, limits.body_limit)
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
            raise ApiError(400, "the body must be a non-empty JSON list such as [{\"src\": \"text\", \"id\": 0}]")
        by_model: dict[int, list[int]] = {}
        for n, item in enumerate(items):
            if not isinstance(item.get("src"), str):
                raise ApiError(400, f"item {n}: src must be a string")
            mid = item.get("id", server.models[0].id if len(server.models) == 1 else None)
            if mid not in [m.id for m in server.models]:
                raise ApiError(400, f"item {n}: no model with id {mid!r}; see GET /translator/models")
            by_model.setdefault(mid, []).append(n)
        n_best = min(server.models[mid].search.n_best for mid in by_model)
        out = [[None] * len(items) for _ in range(n_best)]
        for mid, where in by_model.items():
            model = server.models[mid]
            results = await server.translate_texts(model, [items[n]["src"] for n in where], "text", n_best - 1)
            for n, nbest in zip(where, results):
                for k, (text, score) in enumerate(nbest):
                    out[k][n] = {"src": items[n]["src"], "tgt": text, "n_best": n_best, "pred_score": score}
        return out

    @app.get("/translator/models", summary="The models served (OpenNMT-py's route)")
    async def opennmt_models():
        return [{"model_id": m.id, "path": str(m.path), "src": m.source, "tgt": m.target, "kind": m.kind,
                 "loaded": True} for m in server.models]

    @app.get("/translator/health", summary="200 while the server is up (OpenNMT-py's route)")
    async def opennmt_health():
        return {"status": "ok"}

    page = resources.files("nmt.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return page

    return app


class _OneLineErrors(APIRoute):
    """A route whose unexpected exception becomes a 500 ``{"error": ...}`` logged as one line
    (an exception left to Starlette is answered too, but logged with its traceback)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except (ApiError, Refused, HTTPException, RequestValidationError):
                raise
            except Exception as e:
                raise ApiError(500, f"internal error ({type(e).__name__}: {e})") from None

        return handle


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None
