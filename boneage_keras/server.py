"""The HTTP side of ``boneage serve``: routes, limits, the token, the web page, and
the uvicorn process around them (the model side is ``serve.py``). Needs the ``serve``
extra (FastAPI, uvicorn, python-multipart, prometheus-client).

    >>> run_server(["deploy/cpu-bench"], host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from . import __version__
from .errors import BoneAgeError
from .serve import (
    FIELDS,
    MAX_BATCH_FILES,
    OPEN_PATHS,
    ImageRequest,
    Predictor,
    ServedModel,
    ServeError,
    ServeOptions,
)

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/dicom",
               "application/octet-stream")
FIELD_SCHEMA = {
    "sex": {"type": "string", "enum": ["M", "F"]},
    "chronological_age_months": {"type": "number", "minimum": 0, "maximum": 300},
    "id": {"type": "string"},
    "tta": {"type": "integer", "minimum": 1, "maximum": 8},
    "sex_override": {"type": "boolean"},
    "return_image": {"type": "boolean"},
    # gradcam needs Keras on the server (else 501): documented, not fuzzed
    "explain": {"type": "string", "enum": ["none"],
                "description": "none, or gradcam: a Grad-CAM overlay PNG (gradcam_png) "
                               "where the export has model.keras and Keras is installed, "
                               "else 501"},
}


class ErrorBody(BaseModel):
    """Every error the server answers with."""

    error: str
    code: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": HTTP_WORDS[status]}
            for status in statuses}


HTTP_WORDS = {400: "bad multipart body", 401: "missing or wrong token",
              408: "the upload stalled", 413: "too large", 415: "unsupported format",
              422: "unusable image or field", 501: "not available",
              503: "busy, or not ready"}


class ServeSetupError(BoneAgeError, ValueError):
    """``boneage serve`` cannot start as asked; the message says how to fix it."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path | None, host: str) -> str | None:
    """The bearer token of ``--token-file``; a non-loopback host needs one."""
    if token_file is None:
        if not is_loopback(host):
            raise ServeSetupError(f"--host {host} is reachable from other machines: give "
                                  "--token-file FILE (a secret on its first line) so that "
                                  "only holders of the token can call the API.")
        return None
    path = Path(token_file)
    try:
        token = path.read_text().strip().splitlines()[0].strip() if path.is_file() else ""
    except (OSError, UnicodeDecodeError, IndexError):
        token = ""
    if len(token) < 8:
        raise ServeSetupError(f"--token-file {path}: no token of at least 8 characters on "
                              "its first line; write one (e.g. `openssl rand -hex 32 > "
                              f"{path}`).")
    return token


async def read_body(request: Any, limit: int, stall_s: float) -> bytes:
    """The request body, refused (413) over ``limit`` bytes: from Content-Length before
    reading, else while it streams; a client silent for ``stall_s`` is dropped (408)."""
    length = request.headers.get("content-length")
    mb = limit / 2**20
    if length is not None and length.isdigit() and int(length) > limit:
        raise ServeError(413, "too_large", f"the upload ({int(length) / 2**20:.1f} MB) is "
                         f"over the server's limit of {mb:g} MB (--max-upload-mb).")
    chunks, total = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), stall_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ServeError(408, "stalled_upload", f"the upload stalled for "
                             f"{stall_s:g} s; send it again.") from None
        total += len(chunk)
        if total > limit:
            raise ServeError(413, "too_large", f"the upload is over the server's limit of "
                             f"{mb:g} MB (--max-upload-mb).")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name or None, bytes) for each part, in order, in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServeError(400, "bad_multipart", "multipart/form-data without a boundary in "
                         "its Content-Type.")
    parts: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    def begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=[])

    def header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def part_end() -> None:
        parts.append(dict(state))

    parser = MultipartParser(boundary, {
        "on_part_begin": begin, "on_header_field": header_field,
        "on_header_value": header_value, "on_header_end": header_end,
        "on_part_data": part_data, "on_part_end": part_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as err:  # noqa: BLE001 (python-multipart raises several kinds)
        raise ServeError(400, "bad_multipart", f"the multipart body cannot be parsed "
                         f"({str(err)[:120]}).") from None
    out = []
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition"))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        out.append((name, None if filename is None else filename.decode("utf-8", "replace"),
                    b"".join(part["data"])))
    return out


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ServeError(422, "bad_field", "a form field is not UTF-8 text.") from None


async def image_requests(request: Any, limit: int, batch: bool,
                         stall_s: float) -> list[ImageRequest]:
    """The images of a request and their fields: multipart (``file`` parts and form
    fields, once for all or once per file, in order) or one raw image with the fields
    as query parameters."""
    body = await read_body(request, limit, stall_s)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        if batch:
            raise ServeError(415, "multipart_required", "/v1/predict/batch takes "
                             "multipart/form-data with one `file` part per image.")
        query = request.query_params
        return [ImageRequest(body, "upload", **{k: query.get(k) for k in FIELDS})]
    parts = parse_multipart(body, content_type)
    files = [(filename or f"file {n + 1}", data) for n, (name, filename, data)
             in enumerate(p for p in parts if p[0] == "file")]
    if not files:
        raise ServeError(422, "missing_file", "no `file` part in the form: send the image "
                         "as multipart field `file`.")
    if len(files) > (MAX_BATCH_FILES if batch else 1):
        raise ServeError(422, "too_many_files", f"{len(files)} files: send "
                         + (f"at most {MAX_BATCH_FILES} per batch." if batch else
                            "one to /v1/predict, or several to /v1/predict/batch."))
    values: dict[str, list[str]] = {}
    for name, filename, data in parts:
        if name in FIELDS and filename is None:
            values.setdefault(name, []).append(_text(data))
    requests = []
    for index, (filename, data) in enumerate(files):
        fields = {}
        for name, given in values.items():
            if len(given) not in (1, len(files)):
                raise ServeError(422, "bad_field", f"field {name} given {len(given)} times "
                                 f"for {len(files)} files: give it once for all, or once "
                                 "per file in order.")
            fields[name] = given[0] if len(given) == 1 else given[index]
        requests.append(ImageRequest(data, filename, **fields))
    return requests


def _form_schema(batch: bool) -> dict[str, Any]:
    file_schema = {"type": "string", "format": "binary"}
    properties = {"file": {"type": "array", "items": file_schema, "maxItems": 32}
                  if batch else file_schema, **FIELD_SCHEMA}
    content = {"multipart/form-data": {"schema": {"type": "object",
                                                  "properties": properties,
                                                  "required": ["file"]}}}
    if not batch:
        content.update({t: {"schema": {"type": "string", "format": "binary"}}
                        for t in IMAGE_TYPES})
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": content}}
    if not batch:
        extra["parameters"] = [{"name": k, "in": "query", "required": False, "schema": v}
                               for k, v in FIELD_SCHEMA.items()]
    return extra


def create_app(predictor: Predictor, token: str | None = None) -> Any:
    """The FastAPI application serving ``predictor``."""
    options = predictor.options
    limit = int(options.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: Any):
        predictor.batcher.start()
        loop = asyncio.get_running_loop()
        warming = loop.run_in_executor(predictor.batcher.pool, predictor.warm_up)
        warming.add_done_callback(lambda _: app.state.on_ready())
        yield
        predictor.decoders.shutdown(wait=False)

    app = FastAPI(title="boneage-keras", version=__version__, docs_url=None,
                  redoc_url=None, lifespan=lifespan,
                  description="Bone age (months) from hand radiographs. " + NOTICE_TEXT)
    app.state.on_ready = lambda: None

    def error(status: int, code: str, message: str,
              headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "code": code}, status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        return error(err.status, err.code, str(err), err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http")
        return error(err.status_code, code, f"{request.method} {request.url.path}: "
                     f"{err.detail}.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error(422, "invalid_request", str(err).splitlines()[0][:200])

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, "internal", f"internal error ({type(err).__name__}); the "
                     "server's log has the details.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        route = path if path in ROUTES else "other"
        if token is not None and path not in OPEN_PATHS and not path.startswith("/static/"):
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), token.encode()):
                predictor.metrics.requests.labels(route, "401").inc()
                return error(401, "unauthorized", "missing or wrong token: send "
                             "`Authorization: Bearer <token>` (the --token-file's).")
        response = await call_next(request)
        predictor.metrics.requests.labels(route, str(response.status_code)).inc()
        log.info("%s %s %d %.1f ms", request.method, path, response.status_code,
                 (time.perf_counter() - started) * 1000)
        return response

    @app.post("/v1/predict", openapi_extra=_form_schema(False),
              responses=_errors(400, 401, 408, 413, 415, 422, 501, 503))
    async def predict(request: Request) -> dict[str, Any]:
        """Bone age of one image: multipart `file` + fields, or a raw image body with
        the fields as query parameters."""
        (one,) = await image_requests(request, limit, False, options.stall_limit_s)
        return await predictor.predict(one)

    @app.post("/v1/predict/batch", openapi_extra=_form_schema(True),
              responses=_errors(400, 401, 408, 413, 415, 422))
    async def predict_batch(request: Request) -> dict[str, Any]:
        """Up to 32 images: one result or one error per file, in order."""
        items = await image_requests(request, limit, True, options.stall_limit_s)

        async def one(item: ImageRequest) -> dict[str, Any]:
            try:
                return await predictor.predict(item)
            except ServeError as err:
                return {"id": item.id or None, "file": item.name, "error": str(err),
                        "code": err.code, "status": err.status}

        return {"results": await asyncio.gather(*(one(i) for i in items))}

    @app.get("/v1/model", responses=_errors(401))
    async def model() -> dict[str, Any]:
        """The served model: model.json, sha256, versions, calibration, the notice."""
        return predictor.model_card()

    async def alive() -> dict[str, str]:
        return {"status": "alive"}

    async def ready() -> Any:
        if not predictor.ready:
            return error(503, "not_ready", "the model is loading or warming up.",
                         {"Retry-After": "1"})
        return {"status": "ready"}

    for path in ("/healthz", "/v2/health/live"):
        app.add_api_route(path, alive, methods=["GET"])
    for path in ("/readyz", "/v2/health/ready"):
        app.add_api_route(path, ready, methods=["GET"], responses=_errors(503))

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, **_errors(401)})
    async def metrics() -> Response:
        return Response(generate_latest(predictor.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """Interactive API documentation from /openapi.json, with the package's own
        script (no CDN)."""
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


NOTICE_TEXT = "Research use only, not for diagnostic use."
ROUTES = ("/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz",
          "/v2/health/live", "/v2/health/ready", "/metrics", "/", "/docs", "/openapi.json")


def resident_mb() -> float:
    """This process's resident memory (Linux /proc; elsewhere its peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), else None."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start / ticks
    except (OSError, ValueError, IndexError):
        return None


def run_server(model_paths: Sequence[str | Path], host: str = "127.0.0.1",
               port: int = 8000, token_file: str | Path | None = None,
               options: ServeOptions | None = None) -> None:
    """Load the export(s), then serve until SIGINT/SIGTERM (requests in flight get up
    to 10 s to finish)."""
    import uvicorn

    options = options or ServeOptions()
    token = read_token(token_file, host)
    model = ServedModel(model_paths, threads=options.threads)
    predictor = Predictor(model, options)
    app = create_app(predictor, token)
    scheme_host = f"[{host}]" if ":" in host else host

    def on_ready() -> None:
        age = process_age_s()
        print(f"ready: http://{scheme_host}:{port}/  model {model.name} sha256 "
              f"{model.sha256[:16]}...  started in "
              + (f"{age:.2f} s" if age is not None else "?")
              + f"  resident memory {resident_mb():.0f} MB"
              + ("  (token required)" if token else ""), file=sys.stderr, flush=True)

    app.state.on_ready = on_ready
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=10,
                            lifespan="on")
    # after its graceful shut-down uvicorn raises the signal again for the handler it
    # found: a quiet one, so that SIGTERM and Ctrl-C end the command with exit code 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    print("stopped: requests in flight were answered", file=sys.stderr, flush=True)
