"""Operations endpoints: readiness (/health), liveness (/livez) and Prometheus metrics."""

import asyncio

import msgspec
from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler

from ovis_service.auth import PUBLIC
from ovis_service.config import Settings
from ovis_service.metrics import CONTENT_TYPE, ServiceMetrics
from ovis_service.model_source import public_model_name
from ovis_service.schemas import DeviceHealth, HealthResponse
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import ThreadSnapshot, WorkerSnapshot, WorkerState

# A thread that ended on its own, not by a shutdown: the process needs a restart.
_NOT_ALIVE = (WorkerState.DEAD, WorkerState.FAILED)


class LivenessResponse(msgspec.Struct, kw_only=True):
    status: str  # alive, or the worker state that ended it (dead, failed)
    threads: int
    threads_alive: int
    detail: str | None = None


class OpsController(Controller):
    path = "/"

    @get("/health", opt={PUBLIC: True}, summary="Readiness and queue depth", cache_control=None)
    async def health(
        self, worker: NamedDependency[InferencePool], settings: NamedDependency[Settings]
    ) -> Response[HealthResponse]:
        """Ready (200) only when the model is loaded and the inference thread is alive."""
        snapshot = worker.snapshot()
        ready = snapshot.state is WorkerState.READY
        info = snapshot.info
        body = HealthResponse(
            status="ok" if ready else snapshot.state.value,
            model_loaded=info is not None
            and snapshot.state in (WorkerState.READY, WorkerState.DRAINING),
            queue_depth=snapshot.queue_depth,
            queue_capacity=snapshot.capacity,
            running=snapshot.running,
            device=info.device if info else None,
            model=public_model_name(info.model if info else settings.model),
            offload=info.offload if info else None,
            detail=snapshot.public_detail,
            devices=[_device_health(thread, snapshot) for thread in snapshot.threads],
            levers=dict(info.levers) if info else {},
        )
        return Response(body, status_code=200 if ready else 503)

    @get("/livez", opt={PUBLIC: True}, summary="Liveness", cache_control=None)
    async def livez(self, worker: NamedDependency[InferencePool]) -> Response[LivenessResponse]:
        """200 while the process and its inference threads live: also while the model loads,
        while the queue is full and while draining. 503 only once a thread has died (or its
        model failed to load): then a restart helps, and nothing else does."""
        snapshot = worker.snapshot()
        dead = snapshot.state in _NOT_ALIVE
        body = LivenessResponse(
            status=snapshot.state.value if dead else "alive",
            threads=len(snapshot.threads),
            threads_alive=snapshot.threads_alive,
            detail=snapshot.public_detail if dead else None,
        )
        return Response(body, status_code=503 if dead else 200)


def _device_health(thread: ThreadSnapshot, snapshot: WorkerSnapshot) -> DeviceHealth:
    state = thread.status
    if state == WorkerState.READY.value and snapshot.state is WorkerState.DRAINING:
        state = WorkerState.DRAINING.value  # idle, and taking no new work
    return DeviceHealth(
        thread=thread.index,
        device=thread.device,
        state=state,
        request_id=thread.request_id,
        steps_done=thread.steps_done,
        total_steps=thread.total_steps,
    )


def metrics_route(*, public: bool) -> HTTPRouteHandler:
    """`GET /metrics`, built per app: it needs an API key like any route when keys are set,
    unless `OVIS_METRICS_PUBLIC=true` (a scraper on a private network)."""

    async def metrics(metrics: NamedDependency[ServiceMetrics]) -> Response[bytes]:
        """Prometheus text format: queue, running jobs, requests, refusals, timings, process."""
        # Off the event loop: the backlog gauge asks the job store, which may be slow to answer.
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)

    return get(
        "/metrics",
        opt={PUBLIC: public},
        media_type=CONTENT_TYPE,
        summary="Prometheus metrics",
        cache_control=None,
    )(metrics)
