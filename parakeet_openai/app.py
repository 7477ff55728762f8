"""The ASGI app: OpenAI's `/v1/audio/transcriptions` and `/v1/models`, and `/health`, over the Triton ensemble."""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from parakeet_client.aio import AsyncParakeetClient
from parakeet_client.audio import load_clip
from parakeet_client.errors import AudioDecodeError, AudioTooLongError, ServerRejectedError, ServerUnavailableError
from parakeet_client.retry import RetryPolicy

from . import api
from .settings import GatewayConfig

RETRY_AFTER_S = 1
TRITON_RETRY = RetryPolicy(attempts=3, initial_backoff=0.2, max_backoff=1.0)
UPLOAD_CHUNK = 1 << 20


class UploadTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes ends in 413, refused by Content-Length before it is read."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, _too_large(self.limit))
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise UploadTooLarge()
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> api.ApiError:
    return api.ApiError(413, f"the upload is over the limit of {limit / (1 << 20):g} MiB (--max-upload-mb)",
                        param="file", code="upload_too_large")


async def _send_error(send: Any, error: api.ApiError) -> None:
    response = _error_response(error)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _error_response(error: api.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(config: GatewayConfig) -> Any:
    """The ASGI application for `config` (wrapped in the upload-size limit)."""
    app = FastAPI(title="parakeet-openai", docs_url=None, redoc_url=None, openapi_url=None)
    state = {"in_flight": 0, "client": None}

    def triton() -> AsyncParakeetClient:
        if state["client"] is None:
            state["client"] = AsyncParakeetClient(config.triton_url, timeout=config.request_timeout_s,
                                                  retry=TRITON_RETRY, model=config.triton_model)
        return state["client"]

    @app.on_event("shutdown")
    async def close_client() -> None:
        if state["client"] is not None:
            await state["client"].close()

    @app.exception_handler(api.ApiError)
    async def api_error(_request: Request, error: api.ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(UploadTooLarge)
    async def too_large(_request: Request, _error: UploadTooLarge) -> JSONResponse:
        return _error_response(_too_large(config.max_upload_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(api.ApiError(error.status_code, str(error.detail), code=code))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        return _error_response(api.ApiError(500, f"internal error: {type(error).__name__}: {error}"))

    def authorise(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise api.ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "live"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if await triton().is_ready():
            return JSONResponse({"status": "ready"})
        return _error_response(api.ApiError(503, f"Triton at {config.triton_url} is not ready "
                                                 f"(model {config.triton_model!r})", code="not_ready"))

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "nvidia"}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorise(request)
        return JSONResponse({"object": "list", "data": [model_card(config.model_id)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        authorise(request)
        if model_id not in config.model_names:
            raise api.ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return JSONResponse(model_card(model_id))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        authorise(request)
        if state["in_flight"] >= config.max_concurrency:
            raise api.ApiError(429, f"{config.max_concurrency} transcriptions are in flight (--max-concurrency); "
                                    f"retry after {RETRY_AFTER_S} s", code="too_many_requests",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
        state["in_flight"] += 1
        try:
            return await _transcribe(request)
        finally:
            state["in_flight"] -= 1

    async def _transcribe(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise api.ApiError(400, f"the body must be multipart/form-data, got {content_type or 'no Content-Type'!r}",
                               code="invalid_content_type")
        try:
            form = await request.form(max_files=1, max_fields=64)
        except (UploadTooLarge, api.ApiError):
            raise
        except Exception as error:  # python-multipart's and Starlette's parse errors
            raise api.ApiError(400, f"cannot parse the multipart body: {error}", code="invalid_body") from None
        try:
            fields: dict[str, list[str]] = defaultdict(list)
            upload = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "file":
                        raise api.ApiError(400, f"unexpected file field {name!r}", param=name, code="unknown_parameter")
                    upload = value
                else:
                    fields[name].append(value)
            if upload is None:
                raise api.ApiError(400, "the 'file' field (the audio) is required", param="file",
                                   code="missing_required_parameter")
            request_fields = api.TranscriptionRequest.from_form(fields, config.model_names)
            clip = await asyncio.to_thread(_decode_upload, upload)
        finally:
            await form.close()
        try:
            transcript = await triton().transcribe_clip(clip, timestamps=request_fields.needs_timestamps)
        except AudioTooLongError as error:
            raise api.ApiError(400, f"the audio is {error.audio_seconds:.1f} s long; this server accepts at most "
                                    f"{error.max_audio_seconds:g} s per file", param="file",
                               code="audio_too_long") from None
        except ServerUnavailableError as error:
            raise api.ApiError(503, f"the speech server is unavailable: {error}", code="service_unavailable",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ServerRejectedError as error:
            status = 400 if error.status in ("StatusCode.INVALID_ARGUMENT", "400") else 500
            raise api.ApiError(status, error.reason, param="file" if status == 400 else None,
                               code="invalid_audio" if status == 400 else "inference_failed") from None
        if request_fields.stream:
            return StreamingResponse(api.stream_events(transcript), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        media_type, body = api.render(transcript, request_fields, clip.seconds)
        return Response(body, media_type=media_type)

    return BodyLimit(app, config.max_upload_bytes)


def _decode_upload(upload: UploadFile):
    """The upload as a 16 kHz mono clip, decoded by the client's own reader (soundfile, else ffmpeg)."""
    suffix = Path(upload.filename or "").suffix[:16]
    handle, path = tempfile.mkstemp(prefix="parakeet-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, UPLOAD_CHUNK)
        if os.path.getsize(path) == 0:
            raise api.ApiError(400, "the uploaded file is empty", param="file", code="empty_file")
        try:
            return load_clip(path, name=upload.filename or "upload")
        except AudioDecodeError as error:
            message = str(error).replace(path, upload.filename or "upload")
            raise api.ApiError(400, f"cannot decode the audio file: {message}", param="file",
                               code="invalid_file") from None
        except (ValueError, AudioTooLongError) as error:
            raise api.ApiError(400, f"the audio file is not usable: {error}", param="file", code="invalid_file") from None
    finally:
        os.unlink(path)
