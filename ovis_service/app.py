"""The app factory: settings and engine in, a Litestar app out."""

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgspec
import structlog
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from ovis_service.api import ROUTE_HANDLERS, signature_namespace
from ovis_service.api.dependencies import DEPENDENCIES, Services
from ovis_service.api.docs import SCHEMA_PATH, docs_router, swagger_ui
from ovis_service.api.errors import handle_exception
from ovis_service.api.job_schemas import job_view
from ovis_service.api.ops import metrics_route
from ovis_service.api.page import page_router
from ovis_service.auth import ApiKeyGuard
from ovis_service.config import Settings, load_settings
from ovis_service.engine import Engine
from ovis_service.job_runner import JobRunner
from ovis_service.logs import configure_logging
from ovis_service.metrics import ServiceMetrics
from ovis_service.model_source import preflight
from ovis_service.request_id import RequestIdMiddleware
from ovis_service.schemas import DEFAULT_IMAGE_SIZE, GenerationParams
from ovis_service.store.database import describe, is_postgres, open_database
from ovis_service.store.job_store import JobStore
from ovis_service.webhooks import WebhookSender
from ovis_service.worker.pool import InferencePool

logger = structlog.get_logger(__name__)

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# After the pool has stopped, what the runner still waits for is encoding and storing.
_RUNNER_STOP_SECONDS = 10.0


def _warmup_params(settings: Settings) -> GenerationParams | None:
    """Two steps at the default request size (so the common case finds its kernels ready), with
    guidance on, so the guidance path is exercised too."""
    if not settings.warmup:
        return None
    side = min(DEFAULT_IMAGE_SIZE, settings.max_image_size)
    return GenerationParams(prompt="warm-up", num_inference_steps=2, width=side, height=side)


def _default_engines(settings: Settings) -> tuple[list[Engine], list[str]]:
    """One engine per inference thread: `OVIS_WORKERS` on each device of `OVIS_DEVICES`."""
    # A wrong path or hub id is reported as such, in seconds, before the device check could
    # blame the GPU.
    preflight(settings.model)
    # Imported here so that the app module stays free of torch for tests with fake engines.
    from ovis_service.pipeline import DiffusersEngine  # noqa: PLC0415
    from ovis_service.pipeline.device import plan_threads  # noqa: PLC0415

    devices = [str(device) for device in plan_threads(settings)]
    return [DiffusersEngine(settings, device=device) for device in devices], devices


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    engines: Sequence[Engine] | None = None,
    store: JobStore | None = None,
) -> Litestar:
    """Build the service. Works as `uvicorn --factory ovis_service.app:create_app`, reading
    `OVIS_*` from the environment. Tests inject one `engine`, or several `engines` (one
    inference thread each); without either, the settings say which devices get pipelines.
    The job store is opened here, so an unwritable data directory or an unreachable database
    stops startup (`SettingsError`) before any model loads."""
    if settings is None:
        settings = load_settings()
        configure_logging(settings.log_level)
    if store is None:
        # Before the engines: a bad data directory is refused in a second, not after torch loads.
        store = JobStore(open_database(settings), ttl=settings.job_ttl)
    labels: list[str] | None = None
    if engines is None:
        engines, labels = ([engine], None) if engine is not None else _default_engines(settings)
    metrics = ServiceMetrics()
    worker = InferencePool(
        engines,
        capacity=settings.queue_size,
        warmup=_warmup_params(settings),
        labels=labels,
        observer=metrics,
    )
    metrics.watch(worker.snapshot)
    metrics.watch_backlog(store.count_queued)
    runner = JobRunner(
        store,
        worker,
        settings,
        render=lambda record: msgspec.json.encode(job_view(record, record.base_url)),
        shared=is_postgres(store.engine),
    )

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        logger.info(
            "service_starting",
            model=settings.model,
            queue_size=settings.queue_size,
            offload=settings.offload,
            auth="on" if settings.api_keys else "off",
            job_store=describe(store.engine),
        )
        if not settings.api_keys and settings.host not in _LOOPBACK_HOSTS:
            # A blank OVIS_API_KEY (a later empty line in .env, say) turns auth off silently.
            logger.warning(
                "no_api_key",
                host=settings.host,
                note="anyone who can reach this port can use the GPU; set OVIS_API_KEY",
            )
        # The model loads on the inference thread; /health answers 503 "loading" meanwhile.
        worker.start()
        if settings.webhook_secret:
            runner.webhooks = WebhookSender(settings.webhook_secret, settings.webhook_allowed_hosts)
        await runner.start()
        try:
            yield
        finally:
            # Jobs still queued stay in the store for the next start; running ones drain.
            runner.stop_claiming()
            await asyncio.to_thread(worker.stop, settings.drain_timeout)
            await runner.stop(timeout=_RUNNER_STOP_SECONDS)
            store.close()

    security_components: Components | None = None
    security: list[dict[str, list[str]]] | None = None
    if settings.api_keys:
        security_components = Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
        )
        security = [{"bearer": []}]

    app = Litestar(
        route_handlers=[
            *ROUTE_HANDLERS,
            metrics_route(public=settings.metrics_public),
            docs_router,
            page_router,
        ],
        dependencies=DEPENDENCIES,
        signature_namespace=signature_namespace(settings),
        lifespan=[lifespan],
        middleware=[RequestIdMiddleware],
        before_send=[metrics.before_send],
        guards=[ApiKeyGuard(settings.api_keys)],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="ovis-service",
            version="0.1.0",
            description="Text-to-image generation with Ovis-Image-7B: JSON in, an image out; "
            "also OpenAI's Images API under /v1.",
            components=security_components or Components(),
            security=security,
            path=SCHEMA_PATH,
            render_plugins=[swagger_ui()],  # served from our own assets: works offline
        ),
        logging_config=None,  # structlog owns logging
    )
    Services(
        worker=worker, settings=settings, metrics=metrics, store=store, runner=runner
    ).store_in(app.state)
    return app
