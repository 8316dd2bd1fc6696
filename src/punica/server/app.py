"""The FastAPI app: routes, API-key check, OpenAI-shaped errors, request metrics; `serve` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from punica import (
    AdapterError,
    BadRequestError,
    CapacityError,
    ConfigError,
    Engine,
    PunicaError,
    UnknownModelError,
)
from punica.config import ServerConfig
from punica.server.async_engine import AsyncEngine, EngineFailure
from punica.server.metrics import CONTENT_TYPE, ServerMetrics
from punica.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRARequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRARequest,
    error_body,
)
from punica.server.serving import OpenAIServing, unknown_model

log = logging.getLogger("punica.server")


class HTTPError(Exception):
    """An error with its HTTP status and OpenAI error type, raised by the routes themselves."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code


# exception -> (status, OpenAI error type, code); the first matching class wins
ERRORS: list[tuple[type[BaseException], int, str, str | None]] = [
    (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (AdapterError, 400, "invalid_request_error", "invalid_adapter"),
    (CapacityError, 503, "server_overloaded", "queue_full"),
    (BadRequestError, 400, "invalid_request_error", None),
    (ConfigError, 400, "invalid_request_error", None),
    (PermissionError, 403, "permission_error", "path_not_allowed"),
    (EngineFailure, 500, "server_error", "engine_failure"),
]


def error_response(exc: Exception, retry_after: int) -> JSONResponse:
    if isinstance(exc, HTTPError):
        return JSONResponse(error_body(str(exc), exc.type, exc.code), status_code=exc.status)
    for cls, status, type_, code in ERRORS:
        if isinstance(exc, cls):
            headers = {"Retry-After": str(retry_after)} if status == 503 else None
            return JSONResponse(error_body(str(exc), type_, code), status_code=status, headers=headers)
    log.exception("unexpected error", exc_info=exc)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A 400 naming each invalid field (`param`: the first one), or what is wrong with the body itself."""
    parts, params = [], []
    for err in exc.errors():
        loc = err.get("loc", ())
        if err.get("type") == "json_invalid":
            at = loc[1] if len(loc) > 1 else "?"
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')} at "
                         f"character {at})")
        elif err.get("type") == "model_attributes_type" and tuple(loc) == ("body",):
            kind = "text" if isinstance(err.get("input"), (bytes, str)) else type(err.get("input")).__name__
            parts.append(f"the body must be a JSON object sent as Content-Type: application/json, got {kind}")
        else:
            where = ".".join(str(x) for x in loc if x != "body")
            params.append(where)
            parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    body = error_body("invalid request: " + "; ".join(parts), "invalid_request_error",
                      param=params[0] if params and params[0] else None)
    return JSONResponse(body, status_code=400)


class CountStatus:
    """ASGI middleware counting every HTTP response by route and status (streams included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.count_http(scope["path"], status[0])


class LimitBody:
    """ASGI middleware: a request body over `limit` bytes gets 413 (by its Content-Length before anything is
    read, or as soon as a chunked body passes the limit)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(413, self.message)
            return message

        async def noting(message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, noting)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    @property
    def message(self) -> str:
        return f"the request body exceeds {self.limit} bytes (max_request_bytes)"

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(too_large_body(self.message)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(StarletteHTTPException):
    """A body passed LimitBody's limit while the app read it (an HTTP 413 wherever it is caught)."""


def too_large_body(message: str) -> dict:
    """The 413's body, the same whether Content-Length or the bytes read passed the limit."""
    return error_body(message, "invalid_request_error", "request_too_large")


def api_key_check(api_key: str | None):
    """A dependency: `Authorization: Bearer <api_key>` on every /v1 route when a key is set."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            "authentication_error", "missing_api_key")
        if not hmac.compare_digest(header[7:].strip().encode(), api_key.encode()):
            raise HTTPError(401, "incorrect API key provided", "authentication_error", "invalid_api_key")

    return check


def build_app(engine: Engine, cfg: ServerConfig, model_name: str) -> FastAPI:
    """The app around `engine` (whose step loop starts and stops with the app)."""
    if model_name in engine.list_loras():
        raise ConfigError(f"the adapter {model_name!r} has the base model's served name; rename the adapter or "
                          "pass --served-model-name")
    async_engine = AsyncEngine(engine)
    metrics = ServerMetrics(lambda: async_engine.stats)
    serving = OpenAIServing(async_engine, metrics, model_name, cfg.load_loras_on_demand, cfg.reasoning_parser)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        async_engine.start()
        yield
        await async_engine.stop()

    app = FastAPI(title="Punica", lifespan=lifespan)
    app.state.engine, app.state.metrics = async_engine, metrics
    app.add_middleware(LimitBody, limit=cfg.max_request_bytes)
    app.add_middleware(CountStatus, metrics=metrics)
    app.add_exception_handler(RequestValidationError, lambda _r, e: validation_error(e))
    app.add_exception_handler(StarletteHTTPException, lambda _r, e: JSONResponse(
        error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code, headers=e.headers))
    app.add_exception_handler(_TooLarge, lambda _r, e: JSONResponse(too_large_body(str(e.detail)), status_code=413))
    app.add_exception_handler(Exception, lambda _r, e: error_response(e, cfg.retry_after))
    for cls in (HTTPError, PunicaError, PermissionError, EngineFailure):
        app.add_exception_handler(cls, lambda _r, e: error_response(e, cfg.retry_after))
    app.include_router(_v1_routes(serving, async_engine, cfg, model_name))
    app.include_router(_token_routes(serving, cfg))
    _add_probes(app, async_engine, metrics)
    return app


def _token_routes(serving: OpenAIServing, cfg: ServerConfig) -> APIRouter:
    """/tokenize and /detokenize (vLLM's), behind the API key like /v1."""
    router = APIRouter(dependencies=[Depends(api_key_check(cfg.api_key))])

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(req)

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        return await serving.detokenize(req)

    return router


def _v1_routes(serving: OpenAIServing, engine: AsyncEngine, cfg: ServerConfig, model_name: str) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(cfg.api_key))])

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await serving.completions(req, request)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(req, request)

    async def cards() -> list[ModelCard]:
        """The base model, then the adapters by name."""
        loads = serving.adapters
        base = ModelCard(id=model_name, created=loads.started, root=engine.engine.config.model,
                         max_model_len=serving.max_model_len)
        adapters = await engine.call(engine.engine.list_loras)
        return [base, *(ModelCard(id=name, created=loads.loaded.get(name, loads.started), root=path, parent=model_name)
                        for name, path in sorted(adapters.items()))]

    @router.get("/models")
    async def models() -> ModelList:
        return ModelList(data=await cards())

    @router.get("/models/{model:path}")
    async def model_card(model: str) -> ModelCard:
        for card in await cards():
            if card.id == model:
                return card
        raise unknown_model(model, model_name)

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRARequest) -> dict:
        await serving.adapters.load(req.lora_name, req.lora_path)
        return {"object": "lora_adapter", "id": req.lora_name, "root": req.lora_path, "status": "loaded"}

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRARequest) -> dict:
        if req.lora_name == model_name:
            raise BadRequestError(f"{req.lora_name!r} is the base model, which cannot be unloaded; only adapters can")
        holding = await engine.call(engine.engine.remove_lora, req.lora_name)
        serving.adapters.unloaded(req.lora_name)
        if holding is not None:  # requests in flight need its weights: answer once they are in memory
            with contextlib.suppress(Exception):  # a failed read fails those requests, not the unload
                await asyncio.wrap_future(holding)
        return {"object": "lora_adapter", "id": req.lora_name, "status": "unloaded"}

    return router


def _add_probes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return JSONResponse(error_body("the engine thread is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def serve(engine: Engine, cfg: ServerConfig) -> None:
    """Run the server until interrupted (blocks)."""
    import uvicorn

    name = cfg.served_model_name or os.path.basename(os.path.normpath(engine.config.model))
    app = build_app(engine, cfg, name)
    log.info("serving %s (adapters: %s) on http://%s:%d", name, sorted(engine.list_loras()), cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
