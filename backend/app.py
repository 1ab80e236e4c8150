"""The HTTP service Label Studio talks to (FastAPI).

Label Studio 1.23 calls ``GET /health`` (1 s timeout), ``POST /setup`` (3 s, called
constantly: cheap, never loads a model), ``POST /predict`` (100 s), ``POST /webhook`` and
``GET /versions``; the last two come from the training router (``backend.training_api``).
Every error, FastAPI's own 404/405 included, is a JSON ``{"error": code, "detail": message}``
with a 4xx/5xx status; one bad request never affects another.

``/health`` is answered on the event loop. ``/predict`` runs (model, image downloads, encoding
of the answer) on at most ``PREDICT_CONCURRENCY`` worker threads of its own, so slow downloads
never hold the thread pool ``/setup``, ``/webhook``, ``/versions`` and ``/status`` run on.
Every request body is bounded by ``MAX_BODY_BYTES`` (``backend.limits``).

Run: ``uvicorn backend.app:create_app --factory --host 0.0.0.0 --port 9090`` (``scripts/serve.sh``
does it all).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from backend.auth import install_auth
from backend.conversion_api import build_conversion_router
from backend.errors import AsciiJSONResponse, RequestTooLargeError, malformed_json
from backend.limits import BodySizeLimit
from backend.ls_backend import StableSamBackend
from backend.training_api import build_training_router
from labelstudio.errors import InvalidRequestError, ServiceError
from runtime.logs import configure_logging
from runtime.queue.connection import redis_connection
from runtime.queue.conversion import Conversions
from runtime.settings import Settings, get_settings

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)


class SetupRequest(BaseModel):
    """``POST /setup`` as Label Studio sends it."""

    model_config = ConfigDict(extra="allow")
    project: str | int | None = None  # "<id>.<created_ts>"
    schema_: str | None = Field(default=None, alias="schema")  # the label config XML
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | str | None = None


class SetupResponse(BaseModel):
    model_version: str


class Task(BaseModel):
    """One Label Studio task; ``data`` holds the image URL under the Image tag's value key."""

    model_config = ConfigDict(extra="allow")
    id: int | None = None
    data: dict[str, Any]


class PredictParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = None


class PredictRequest(BaseModel):
    """``POST /predict``: tasks, project, label_config and ``params.context`` (interactive)."""

    model_config = ConfigDict(extra="allow")
    tasks: list[Task]
    project: str | int | None = None
    label_config: str | None = None
    params: PredictParams | None = None
    context: dict[str, Any] | None = None  # older clients send it at the top level


class PredictionEntry(BaseModel):
    result: list[dict[str, Any]]
    score: float
    model_version: str


class PredictResponse(BaseModel):
    results: list[PredictionEntry]


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return "malformed_json", "the request body is not valid JSON"
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid_request", "; ".join(parts)


def _http_error(exc: HTTPException) -> ServiceError:
    """Our error for one of Starlette/FastAPI's own (404 route, 405 method, 400 body parse)."""
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        return malformed_json(exc.__cause__)  # json.loads refused the body
    if exc.status_code == 400:
        return InvalidRequestError(str(exc.detail))
    if exc.status_code == 413:
        return RequestTooLargeError(str(exc.detail))
    try:  # 404 "not_found", 405 "method_not_allowed", ...
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        code = "http_error"
    return ServiceError(str(exc.detail), code=code, status_code=exc.status_code)


def load_json(body: bytes) -> Any:
    """``body`` parsed as JSON, or 400 ``malformed_json``.

    Called on worker threads, like ``validate``: parsing and validating a large body is CPU
    work that must not hold up the event loop, where ``/health`` is answered.
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError too
        raise malformed_json(exc) from exc


def validate(data: Any, model: type[ModelT]) -> ModelT:
    """``data`` as ``model``, or 422 ``invalid_request`` naming the fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc


def _predict_json(backend: StableSamBackend, body: bytes) -> bytes:
    """The ``/predict`` answer as JSON bytes; runs on a predict worker thread, start to end
    (parsing the body included)."""
    data = load_json(body)
    if isinstance(data, dict):
        backend.limits.check_batch_tasks(data.get("tasks"))  # before validating each one
    request = validate(data, PredictRequest)
    context = request.params.context if request.params else None
    context = context if context is not None else request.context
    tasks = [task.model_dump() for task in request.tasks]
    results = backend.predict(tasks, context, request.project, request.label_config)
    # Serialised directly with orjson: a brush RLE is a long list of ints (~240k for a
    # fragmented 1024 px mask), which the json module encodes in ~18 ms and orjson in ~2;
    # re-validating it through the response model would cost more than either. Here, not on
    # the event loop: 200 concurrent clicks encoded there made /health wait 2.6 s.
    return orjson.dumps({"results": results})


def create_app(
    settings: Settings | None = None, backend: StableSamBackend | None = None
) -> FastAPI:
    """The FastAPI app serving ``backend`` (built from ``settings`` when not given)."""
    settings = settings or get_settings()
    backend = backend or StableSamBackend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        # Made here, inside the serving event loop: /predict's own worker-thread slots.
        app.state.predict_limiter = anyio.CapacityLimiter(settings.predict_concurrency)
        if settings.preload_model:
            threading.Thread(target=_preload, args=(backend,), daemon=True).start()
        yield
        backend.close()

    app = FastAPI(
        title="Stable-SAM Label Studio ML backend",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.settings = settings
    install_auth(app, settings)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # outermost

    @app.exception_handler(ServiceError)
    async def _backend_error(request: Request, exc: ServiceError) -> JSONResponse:
        logger.warning("%s %s -> %d %s: %s", request.method, request.url.path,
                       exc.status_code, exc.code, exc.detail)  # fmt: skip
        return AsciiJSONResponse(exc.to_json(), status_code=exc.status_code)

    @app.exception_handler(HTTPException)
    async def _starlette_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = _http_error(exc)
        logger.warning("%s %s -> %d %s: %s", request.method, request.url.path,
                       error.status_code, error.code, error.detail)  # fmt: skip
        return AsciiJSONResponse(
            error.to_json(), status_code=error.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, detail = _validation_message(exc)
        logger.warning("%s %s -> %s: %s", request.method, request.url.path, code, detail)
        status = 400 if code == "malformed_json" else 422
        return AsciiJSONResponse({"error": code, "detail": detail}, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return AsciiJSONResponse(
            {"error": "internal_error", "detail": f"{type(exc).__name__}: see the backend log"},
            status_code=500,
        )

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        """Liveness for Label Studio (1 s timeout): answered on the event loop, so it never
        waits for a worker thread, the model or an image download."""
        return {
            "status": "UP",
            "model_class": type(backend).__name__,
            "model_version": backend.models.spec.version,
            "model_loaded": backend.models.loaded,
            "model_warm": backend.models.warm,
            "model_error": backend.models.error,
        }

    def _setup(body: bytes) -> SetupResponse:
        backend.limits.check_setup_body(body)
        request = validate(load_json(body), SetupRequest)
        backend.limits.check_label_config(request.schema_, "schema")
        version = backend.setup(
            request.project, request.schema_, request.hostname, request.access_token
        )
        return SetupResponse(model_version=version)

    # The bodies are read here and parsed on a worker thread (``load_json``): the schemas
    # below document them (FastAPI would otherwise parse them on the event loop).
    @app.post("/setup", response_model=SetupResponse, openapi_extra=_body_schema(SetupRequest))
    async def setup(http: Request) -> SetupResponse:
        """Cheap: remembers the config and Label Studio's address/token; never loads a model."""
        return await anyio.to_thread.run_sync(_setup, await http.body())

    @app.post(
        "/predict", response_model=PredictResponse, openapi_extra=_body_schema(PredictRequest)
    )
    async def predict(http: Request) -> Response:
        """Interactive (``params.context``) masks, or the task-open warm-up (no context)."""
        answer = await anyio.to_thread.run_sync(
            _predict_json, backend, await http.body(), limiter=http.app.state.predict_limiter
        )
        return Response(answer, media_type="application/json")

    connection = redis_connection(settings.redis_url)
    app.include_router(build_training_router(settings, connection))  # /webhook, /versions, /status
    app.include_router(  # /convert
        build_conversion_router(
            settings.redis_url,
            Conversions.from_settings(settings, connection),
            backend.models.model_version,
            backend.label_config_of,
        )
    )
    return app


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an endpoint that parses its body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _preload(backend: StableSamBackend) -> None:
    try:
        backend.models.warm_up()
    except ServiceError as exc:
        logger.error("model preload failed: %s", exc.detail)
