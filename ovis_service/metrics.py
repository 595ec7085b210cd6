"""Prometheus metrics, in a registry of the app's own (not the process-wide default), so that
tests can build several apps in one process.

Gauges are read from the worker's snapshot when Prometheus scrapes, so they cannot drift from
what /health says. Counters and histograms move where the service decides: the worker reports
refusals and finished jobs through its observer, and Litestar's `before_send` hook counts
responses by route template and status.
"""

from collections.abc import Callable, Iterator
from typing import get_args

from litestar.types import Message, Scope
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from ovis_service.errors import RejectReason
from ovis_service.worker.types import JobOutcome, WorkerSnapshot, WorkerState

# The classic text format, which every Prometheus 2.x parses (Litestar adds the charset).
CONTENT_TYPE = "text/plain; version=0.0.4"
UNMATCHED = "unmatched"  # the endpoint label of a request that matched no route
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
# An image takes from about a second (small, few steps, fast GPU) to minutes (CPU, offload);
# queue waits start at zero.
GENERATION_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
QUEUE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _WorkerCollector(Collector):
    def __init__(self, snapshot: Callable[[], WorkerSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        loaded = snap.state in (WorkerState.READY, WorkerState.DRAINING)
        for name, text, value in (
            ("ovis_queue_depth", "Jobs waiting in the queue, not yet running.", snap.queue_depth),
            ("ovis_running_jobs", "Jobs running on a device right now.", snap.running),
            ("ovis_queue_capacity", "Jobs the queue holds before refusing.", snap.capacity),
            ("ovis_model_loaded", "1 when every inference thread has loaded.", int(loaded)),
            ("ovis_inference_threads_alive", "Inference threads alive.", snap.threads_alive),
        ):
            yield GaugeMetricFamily(name, text, value=value)


class _BacklogCollector(Collector):
    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        try:
            pending = self._count()
        except SQLAlchemyError:
            return  # the store is down: no figure rather than a wrong one or a failed scrape
        yield GaugeMetricFamily(
            "ovis_pending_jobs",
            "Async jobs waiting in the job store; with a shared PostgreSQL store every replica "
            "reports the same backlog, so aggregate it with max, not sum.",
            value=pending,
        )


class ServiceMetrics:
    """One app's metrics; also the worker's observer (its methods are thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._requests = Counter(
            "ovis_requests_total",
            "HTTP responses by route template and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "ovis_rejected_total",
            "Jobs refused or stopped by the service, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REJECT_REASONS:
            self._rejected.labels(reason=reason)  # every reason exists from the start, at 0
        self._generation = Histogram(
            "ovis_generation_seconds",
            "Time on the device per finished image.",
            buckets=GENERATION_BUCKETS,
            registry=self.registry,
        )
        self._queue_wait = Histogram(
            "ovis_queue_wait_seconds",
            "Time a finished image waited in the queue.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )

    def watch(self, snapshot: Callable[[], WorkerSnapshot]) -> None:
        """Read the gauges from `snapshot` at each scrape."""
        self.registry.register(_WorkerCollector(snapshot))

    def watch_backlog(self, count: Callable[[], int]) -> None:
        """Read `ovis_pending_jobs` from the job store at each scrape."""
        self.registry.register(_BacklogCollector(count))

    # -- the worker's observer ------------------------------------------------------------------

    def job_rejected(self, reason: RejectReason) -> None:
        self._rejected.labels(reason=reason).inc()

    def job_finished(self, outcome: JobOutcome) -> None:
        self._generation.observe(outcome.generation_seconds)
        self._queue_wait.observe(outcome.queue_seconds)

    # -- HTTP -------------------------------------------------------------------------------------

    def request_done(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def before_send(self, message: Message, scope: Scope) -> None:
        """Litestar's `before_send` hook: counts every HTTP response as it starts, error
        responses included. The label is the route's template (`/generate`), never the raw path,
        so a scan of random URLs cannot grow the label set."""
        if message["type"] == "http.response.start":
            self.request_done(scope.get("path_template") or UNMATCHED, message["status"])
