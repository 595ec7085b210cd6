"""Operations endpoints: readiness (and, as they land, liveness and metrics)."""

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from ovis_service.auth import PUBLIC
from ovis_service.config import Settings
from ovis_service.schemas import HealthResponse
from ovis_service.worker import InferenceWorker, WorkerState


class OpsController(Controller):
    path = "/"

    @get("/health", opt={PUBLIC: True}, summary="Readiness and queue depth", cache_control=None)
    async def health(
        self, worker: NamedDependency[InferenceWorker], settings: NamedDependency[Settings]
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
            model=info.model if info else settings.model,
            offload=info.offload if info else None,
            detail=snapshot.detail,
        )
        return Response(body, status_code=200 if ready else 503)
