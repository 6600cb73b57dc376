"""The Starlette app of ``rainclf serve``: routes, model loading, error answers.

    GET  /healthz      200 {"status": "ok"} once loaded ("loading" while loading: the process is
                       alive); 503 {"status": "error"} if the model could not be loaded
    GET  /readyz       200 {"status": "ok"} once loaded, else 503 (+ Retry-After while loading;
                       a --workers process loads before it accepts connections)
    GET  /metrics      Prometheus text (rainclf.serve.metrics)
    GET  /v1/model     {"model": {...}}
    POST /v1/predict   multipart/form-data parts named "file", or one image as the body
                       (application/octet-stream or image/*, ?filename= names it) →
                       {"model": {...}, "predictions": [{"filename", "label", "p_rain", "error"}, ...]}
                       in upload order; a part that is not a readable image is an entry with an
                       error, the others are answered

Every error is JSON ``{"error": "..."}`` with a 4xx status for bad input (400 malformed or no
images, 413 too large, 415 wrong Content-Type), 503 + Retry-After when loading or full, and 500
only for a fault of the server itself. A request's images are decoded on a thread pool, then
wait in the micro-batcher (rainclf.serve.batcher) for one onnxruntime call shared with others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rainclf.data.images import ImageError
from rainclf.serve.batcher import MicroBatcher, ShuttingDown
from rainclf.serve.config import ServeOptions
from rainclf.serve.engine import ServedModel, part_name
from rainclf.serve.metrics import Metrics
from rainclf.serve.uploads import RequestError, read_body, uploads

log = logging.getLogger("rainclf.serve")


class ServeState:
    """What the routes share: the model, its loading state, the batcher, the metrics."""

    def __init__(self, options: ServeOptions, model: ServedModel, on_fatal: Callable[[str], None]):
        self.options, self.model, self.on_fatal = options, model, on_fatal
        self.metrics = Metrics()
        self.status, self.error = "loading", None        # loading → ok | error
        self.batcher: MicroBatcher | None = None
        self.decoders = anyio.CapacityLimiter(options.threads)

    async def start(self, background: bool) -> None:
        """Start the batcher and load the model: in the background (one process: /readyz says 503
        meanwhile), or before accepting connections (a --workers process: the others take the
        connections until it is ready; a failed load fails its startup)."""
        m, o = self.metrics, self.options
        self.batcher = MicroBatcher(self.model.p_rain, o.max_batch, o.max_wait_ms / 1000, o.max_queue,
                                    on_batch=m.batch, on_depth=m.queue_depth.set)
        self.batcher.start()
        if background:
            self._loading = asyncio.get_running_loop().create_task(self._load(reraise=False))
        else:
            await self._load(reraise=True)

    async def _load(self, reraise: bool) -> None:
        t = time.perf_counter()
        try:
            await anyio.to_thread.run_sync(self.model.load)
        except Exception as e:  # noqa: BLE001 — reported by /healthz and the log, then the server exits
            self.status, self.error = "error", f"the model could not be loaded: {' '.join(str(e).split())}"
            log.error("rainclf serve: %s", self.error)
            self.on_fatal(self.error)
            if reraise:
                raise
            return
        self.status = "ok"
        self.metrics.ready.set(1)
        log.info("rainclf serve: %s loaded in %.1f s (%s, max batch %d, max wait %g ms)", self.model.directory,
                 time.perf_counter() - t, self.model.info["provider"], self.options.max_batch,
                 self.options.max_wait_ms)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    # ------------------------------------------------------------------ predict
    async def predict(self, request: Request) -> dict:
        if self.status != "ok":
            raise RequestError(503, "loading", self.error or "the model is still loading: retry shortly",
                               retry_after=None if self.error else 1)
        self._check_room(1)
        body = await read_body(request, self.options.max_body_bytes)
        files = uploads(request.headers.get("content-type"), body, request.query_params.get("filename"))
        del body
        n = len(files)
        if n > self.options.max_queue:
            raise RequestError(413, "too_large", f"{n} images in one request; this server admits at most "
                                                 f"{self.options.max_queue} at a time (--max-queue): split it")
        self._check_room(n)
        self.batcher.admit(n)
        try:
            rows = await anyio.to_thread.run_sync(self._decode, files, limiter=self.decoders)
            del files
            good = [r for r in rows if r["error"] is None]
            for r, p in zip(good, await self.batcher.p_rain([r.pop("_rows") for r in good])):
                r.update(label=self.model.label(p), p_rain=p)
        finally:
            self.batcher.release(n)
        bad = n - len(good)
        self.metrics.images.labels("predicted").inc(len(good))
        if bad:
            self.metrics.images.labels("error").inc(bad)
            self.metrics.errors.labels("bad_image").inc(bad)
        return {"model": self.model.info, "predictions": rows}

    def _check_room(self, n: int) -> None:
        if self.batcher.admitted + n > self.options.max_queue:
            raise RequestError(503, "queue_full", f"the server is busy ({self.batcher.admitted} images queued, "
                                                  f"--max-queue {self.options.max_queue}): retry shortly",
                               retry_after=1)

    def _decode(self, files) -> list[dict]:
        """On a decoder thread: each upload → its pixel rows, or its error."""
        rows = []
        for i, f in enumerate(files):
            row = {"filename": f.filename, "label": None, "p_rain": None, "error": None}
            try:
                row["_rows"] = self.model.preprocess(f.data, part_name(f.filename, i))
            except ImageError as e:
                row["error"] = str(e)
            rows.append(row)
        return rows


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(options: ServeOptions, model: ServedModel | None = None,
               on_fatal: Callable[[str], None] = lambda message: None, load_in_background: bool = True) -> Starlette:
    """The app for ``options``; ``model`` defaults to ``ServedModel(options.model)``, whose export
    is checked here (ServeError) and whose session is opened at startup (see ServeState.start)."""
    model = model or ServedModel(options.model, options.max_image_pixels)
    state = ServeState(options, model, on_fatal)
    metrics = state.metrics

    def timed(route: str):
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                t = time.perf_counter()
                response = await handler(request)
                metrics.request(route, response.status_code, time.perf_counter() - t)
                return response
            return endpoint
        return wrap

    @timed("healthz")
    async def healthz(request: Request) -> Response:
        if state.status == "error":
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        return JSONResponse({"status": state.status})

    @timed("readyz")
    async def readyz(request: Request) -> Response:
        if state.status == "ok":
            return JSONResponse({"status": "ok"})
        body = {"status": state.status, **({"error": state.error} if state.error else {})}
        return JSONResponse(body, status_code=503, headers=None if state.error else {"Retry-After": "1"})

    @timed("metrics")
    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @timed("model")
    async def model_route(request: Request) -> Response:
        if state.status != "ok":
            return _error(503, state.error or "the model is still loading", None if state.error else 1)
        return JSONResponse({"model": model.info})

    @timed("predict")
    async def predict(request: Request) -> Response:
        try:
            return JSONResponse(await state.predict(request))
        except RequestError as e:
            metrics.errors.labels(e.kind).inc()
            return _error(e.status, e.message, e.retry_after)
        except ShuttingDown as e:
            metrics.errors.labels("shutting_down").inc()
            return _error(503, str(e), 1)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        metrics.errors.labels(kind).inc()
        metrics.request("other", exc.status_code, 0.0)
        message = {404: f"no route {request.url.path}: use POST /v1/predict, GET /healthz, /readyz, /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, message)

    async def server_error(request: Request, exc: Exception) -> Response:
        metrics.errors.labels("internal").inc()
        log.exception("rainclf serve: internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.start(load_in_background)
        try:
            yield
        finally:
            await state.stop()

    app = Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz),
                            Route("/metrics", metrics_route), Route("/v1/model", model_route),
                            Route("/v1/predict", predict, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.rainclf = state
    return app


def app_from_env() -> Starlette:
    """uvicorn's factory for ``--workers N``: each worker reads its options from the environment."""
    return create_app(ServeOptions.from_env(), load_in_background=False)
