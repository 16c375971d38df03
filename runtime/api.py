"""HTTP layer: `build_app(settings)` with thin routers, guards and one error mapping.

Called by `kaito.runtime.launch` (behind `python -m kaito.runtime` and `kaito serve`, uvicorn) and by tests
(in-process ASGI or a real uvicorn). Routers only validate and delegate to
`kaito.runtime.openai_serving` / `responses` / `kaito_chat`; every failure is
mapped here: OpenAI's `{"error": {...}}` envelope under /v1, FastAPI's
`{"detail": ...}` elsewhere (Kaito's /chat), never a stack trace.

Endpoints: GET / | /health | /healthz | /metrics (Prometheus) | /kaito/metrics
(Kaito's JSON GPU/CPU info) | /v1/models | /v1/models/{id}; POST /chat | /v1/chat/completions |
/v1/completions | /v1/responses | /v1/load_lora_adapter | /v1/unload_lora_adapter.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kaito.presets.errors import validation_problem
from kaito.runtime import kaito_chat as kchat
from kaito.runtime import openai_serving as oai
from kaito.runtime import responses as resp
from kaito.runtime.metrics import system_info
from kaito.runtime.plan import StepPlan
from kaito.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    KaitoChatRequest,
    LoadLoraRequest,
    ResponsesRequest,
    UnloadLoraRequest,
)
from kaito.runtime.serving import ApiError, Runtime, not_found
from kaito.runtime.settings import RuntimeSettings
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("kaito.runtime.api")
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 413: "RequestTooLargeError", 422: "BadRequestError", 429: "RateLimitError",
          503: "ServiceUnavailableError"}


def _is_openai(path: str) -> bool:
    return path.startswith("/v1")


def error_response(path: str, status: int, message: str, type_: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body: dict[str, object]
    if _is_openai(path):
        body = {"error": {"message": message, "type": type_ or _TYPES.get(status, "InternalServerError"), "param": param, "code": status}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


class GuardMiddleware:
    """Body size limit, JSON sanity (depth/encoding) and the optional Bearer key, before any routing."""

    def __init__(self, app, settings: RuntimeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limit = scope["path"], self.settings.max_body_bytes
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        if key and path.startswith(("/v1", "/chat")):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {key}".encode()):
                return await error_response(path, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await error_response(path, 413, f"request body over the {limit}-byte limit")(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await error_response(path, 413, f"request body over the {limit}-byte limit")(scope, receive, send)
        if body:
            try:
                json.loads(body)
            except RecursionError:
                return await error_response(path, 400, "JSON nested too deeply")(scope, receive, send)
            except (ValueError, UnicodeDecodeError) as e:
                return await error_response(path, 400, f"body is not valid JSON: {str(e)[:200]}")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The request's first schema errors as `field.path: message` (the project's one formatter), and the
    top-level field for OpenAI's `param`."""
    parts, param = [], None
    for e in exc.errors()[:10]:
        loc = [x for x in e.get("loc", ()) if x != "body"]
        param = param or (str(loc[0]) if loc else None)
        parts.append(validation_problem({**e, "loc": loc}, root="body"))
    return "; ".join(parts) or "invalid request body", param


def health_routes(health: Callable[[], Awaitable[tuple[int, dict]]]) -> APIRouter:
    """GET / and GET /health (alias /healthz) as Kaito's server answers them, for this server and for a
    torchrun worker's probe server (`kaito.runtime.distributed.health_app`); `health()` gives (status, body)."""
    router = APIRouter()

    @router.get("/")
    async def root():
        return {"message": "Server is running"}

    @router.get("/health")
    @router.get("/healthz")
    async def check():
        status, body = await health()
        return body if status == 200 else JSONResponse(body, status_code=status)

    return router


def build_app(settings: RuntimeSettings, broadcast: Callable[[StepPlan], None] | None = None,
              runtime: Runtime | None = None, load_in_background: bool = True) -> FastAPI:
    """The server for these settings; loading starts at startup (503 on /health until done)."""
    rt = runtime or Runtime(settings, broadcast=broadcast)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if rt.status == "loading" and not rt.ready.is_set():
            if load_in_background:
                threading.Thread(target=rt.load, name="kaito-load", daemon=True).start()
            else:
                await asyncio.to_thread(rt.load)
        try:
            yield
        finally:
            await asyncio.to_thread(rt.close)

    app = FastAPI(title="kaito runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = rt
    app.add_middleware(GuardMiddleware, settings=settings)
    _error_handlers(app)
    app.include_router(health_routes(_runtime_health(rt)))
    app.include_router(_info_routes(rt, settings))
    app.include_router(_inference_routes(rt))
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's envelope under /v1 and `{"detail": ...}` elsewhere, never a stack trace."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        if _is_openai(request.url.path):
            return error_response(request.url.path, 400, msg, "BadRequestError", param)
        return JSONResponse({"detail": msg}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, "internal error; see the server log", "InternalServerError")


def _runtime_health(rt: Runtime) -> Callable[[], Awaitable[tuple[int, dict]]]:
    async def health() -> tuple[int, dict]:
        engine_error = rt.engine.error if rt.engine is not None else None
        if rt.status == "ready" and engine_error is None:
            return 200, {"status": "Healthy"}
        if rt.status == "loading":
            return 503, {"status": "Loading", "detail": "model is loading"}
        cause = rt.error or engine_error or "unknown error; see the server log"
        return 503, {"status": "Unhealthy", "detail": f"unhealthy: {cause}"}
    return health


def _info_routes(rt: Runtime, settings: RuntimeSettings) -> APIRouter:
    """Metrics (Prometheus and Kaito's JSON) and the model list."""
    router = APIRouter()

    @router.get("/metrics")
    async def metrics():
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/kaito/metrics")
    async def kaito_metrics():
        return await asyncio.to_thread(system_info)

    def model_cards() -> list[dict]:
        loaded, _ = rt.ready_parts()
        base = {"id": rt.model_name, "object": "model", "created": 0, "owned_by": "kaito", "root": str(settings.model_dir),
                "parent": None, "max_model_len": loaded.max_model_len}
        return [base] + [{"id": n, "object": "model", "created": 0, "owned_by": "kaito", "root": n,
                          "parent": rt.model_name, "strength": s} for n, s in sorted(rt.strengths.items())]

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_cards()}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        cards = model_cards()
        if oai.is_base_path(rt, model_id) or model_id in rt.base_names():
            return cards[0]
        for card in cards[1:]:
            if card["id"] == model_id:
                return card
        raise not_found(model_id)

    return router


def _inference_routes(rt: Runtime) -> APIRouter:
    """Generation (OpenAI and Kaito's /chat) and adapters at run time, each delegated to its serving module."""
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await oai.chat_completions(rt, req, request)

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await oai.completions(rt, req, request)

    @router.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        return await resp.create(rt, req, request)

    @router.post("/chat")
    async def chat(req: KaitoChatRequest, request: Request):
        return await kchat.kaito_chat(rt, req, request)

    @router.post("/v1/load_lora_adapter")
    async def load_lora(req: LoadLoraRequest):
        rt.require_ready()
        return await rt.load_adapter(req.lora_name, req.lora_path, req.image, req.strength)

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora(req: UnloadLoraRequest):
        rt.require_ready()
        return await rt.unload_adapter(req.lora_name)

    return router
