"""What handlers receive by injection: the worker pool and the settings live in `app.state`,
where the lifespan that owns them put them."""

from litestar.datastructures import State
from litestar.di import Provide

from ovis_service.config import Settings
from ovis_service.worker.pool import InferencePool

WORKER_STATE_KEY = "worker"
SETTINGS_STATE_KEY = "settings"


def provide_worker(state: State) -> InferencePool:
    worker: InferencePool = state[WORKER_STATE_KEY]
    return worker


def provide_settings(state: State) -> Settings:
    settings: Settings = state[SETTINGS_STATE_KEY]
    return settings


DEPENDENCIES = {
    "worker": Provide(provide_worker, sync_to_thread=False),
    "settings": Provide(provide_settings, sync_to_thread=False),
}
