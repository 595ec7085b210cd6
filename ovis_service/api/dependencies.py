"""What handlers receive by injection. `create_app` stores the pool, the settings, the metrics,
the job store and the job runner once, as one `Services` in `app.state`; handlers name
`worker`, `settings`, `metrics`, `store` or `runner` as parameters and Litestar provides them."""

from dataclasses import dataclass

from litestar.datastructures import State
from litestar.di import Provide

from ovis_service.config import Settings
from ovis_service.job_runner import JobRunner
from ovis_service.metrics import ServiceMetrics
from ovis_service.store.job_store import JobStore
from ovis_service.worker.pool import InferencePool

_STATE_KEY = "services"


@dataclass(frozen=True)
class Services:
    worker: InferencePool
    settings: Settings
    metrics: ServiceMetrics
    store: JobStore
    runner: JobRunner

    def store_in(self, state: State) -> None:
        state[_STATE_KEY] = self


def services_in(state: State) -> Services:
    services: Services = state[_STATE_KEY]
    return services


def _worker(state: State) -> InferencePool:
    return services_in(state).worker


def _settings(state: State) -> Settings:
    return services_in(state).settings


def _metrics(state: State) -> ServiceMetrics:
    return services_in(state).metrics


def _store(state: State) -> JobStore:
    return services_in(state).store


def _runner(state: State) -> JobRunner:
    return services_in(state).runner


DEPENDENCIES = {
    "worker": Provide(_worker, sync_to_thread=False),
    "settings": Provide(_settings, sync_to_thread=False),
    "metrics": Provide(_metrics, sync_to_thread=False),
    "store": Provide(_store, sync_to_thread=False),
    "runner": Provide(_runner, sync_to_thread=False),
}
