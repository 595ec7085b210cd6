"""`ovis-service`: run the app under uvicorn, drain on SIGTERM and exit 0.

`ovis-service batch ...` is the batch client instead (`ovis_service.batch`).
"""

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import msgspec
import structlog
import uvicorn
from litestar import Litestar

from ovis_service import batch
from ovis_service.api.dependencies import services_in
from ovis_service.app import create_app
from ovis_service.config import Settings, SettingsError, load_settings
from ovis_service.envfile import apply_env_file
from ovis_service.logs import configure_logging
from ovis_service.model_source import ModelLoadError
from ovis_service.store.database import hold_data_dir
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import WorkerState

logger = structlog.get_logger(__name__)

EXIT_CONFIG_ERROR = 2
EXIT_FAILED = 1  # the model did not load, or the inference thread died


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with two hooks into its own shutdown sequence (no extra signal handler):

    - the worker stops taking jobs and starts its drain clock the moment shutdown begins, while
      uvicorn is still waiting for in-flight requests;
    - a model that failed to load, or a dead inference thread, stops the server, so that the
      process exits non-zero and a restart policy can act.
    """

    def __init__(self, config: uvicorn.Config, worker: InferencePool, drain_timeout: float):
        super().__init__(config)
        self._worker = worker
        self._drain_timeout = drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        state = self._worker.snapshot().state
        if state in (WorkerState.FAILED, WorkerState.DEAD):
            logger.error("stopping_server", reason=f"inference worker {state.value}")
            return True
        return False

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._worker.begin_drain(self._drain_timeout)
        await super().shutdown(sockets)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ovis-service",
        description="Serve Ovis-Image-7B over HTTP. Settings come from OVIS_* variables.",
        epilog="`ovis-service batch --help`: send a JSONL file of requests to a running service.",
    )
    parser.add_argument("--host", help="overrides OVIS_HOST")
    parser.add_argument("--port", type=int, help="overrides OVIS_PORT")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="overrides OVIS_WORKERS: pipelines (inference threads) per device, each with its "
        "own copy of the model",
    )
    parser.add_argument("--reload", action="store_true", help="restart on code changes (dev)")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _swallow_reraised_signal(_signum: int, _frame: FrameType | None) -> None:
    """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, which would end the process
    as killed-by-signal (143). The drain already ran, so the signal has done its job."""


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # .env first: the batch client reads OVIS_API_KEY from it too.
    env_file = apply_env_file()
    if argv[:1] == ["batch"]:
        return batch.main(argv[1:])
    args = _parse_args(argv)
    try:
        settings = load_settings(origins=env_file.origins() if env_file else None)
    except SettingsError as exc:
        print(f"ovis-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(settings.log_level)
    if env_file is not None:
        logger.info("env_file_read", path=str(env_file.path), variables=sorted(env_file.applied))
    host = args.host or settings.host
    port = args.port or settings.port
    if args.workers is not None:
        settings = msgspec.structs.replace(settings, workers=args.workers)

    if args.reload:
        # The reloader's child process builds the app from the environment, so the flag goes
        # there. Workers are inference threads in this one process: no uvicorn workers.
        os.environ["OVIS_WORKERS"] = str(settings.workers)
        uvicorn.run(
            "ovis_service.app:create_app",
            factory=True,
            host=host,
            port=port,
            reload=True,
            # Watch the package only, not the multi-gigabyte virtual environment beside it.
            reload_dirs=[str(Path(__file__).resolve().parent)],
            log_config=None,
        )
        return 0
    return _serve(settings, host, port)


def _serve(settings: Settings, host: str, port: int) -> int:
    try:
        data_dir = hold_data_dir(settings)  # noqa: F841  (held open until the process ends)
        app = create_app(settings)
    except SettingsError as exc:
        print(f"ovis-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except ModelLoadError as exc:
        print(f"ovis-service: model failed to load: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return run_server(app, settings, host=host, port=port)


def run_server(app: Litestar, settings: Settings, *, host: str, port: int) -> int:
    """Serve `app` in this process until SIGTERM/SIGINT; 0 after a clean drain, 1 otherwise."""
    worker = services_in(app.state).worker
    config = uvicorn.Config(app, host=host, port=port, log_config=None, server_header=False)
    server = DrainingServer(config, worker, settings.drain_timeout)
    previous = {
        sig: signal.signal(sig, _swallow_reraised_signal) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    snapshot = worker.snapshot()
    if snapshot.state is not WorkerState.STOPPED:
        logger.error("exited_unclean", worker_state=snapshot.state.value)
        if snapshot.state is WorkerState.FAILED and snapshot.detail:
            # The one line an operator reads first; the log above has the rest.
            print(f"ovis-service: {snapshot.detail}", file=sys.stderr)
        return EXIT_FAILED
    logger.info("exited_clean")
    return 0
