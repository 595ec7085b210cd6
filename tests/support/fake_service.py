"""Run the real app and server around a `FakeEngine`: `python -m tests.support.fake_service`.

Settings come from `OVIS_*` as usual; `FAKE_STEP_SECONDS` sets how long each step takes.
"""

import os

from ovis_service.app import create_app
from ovis_service.cli import run_server
from ovis_service.config import load_settings
from ovis_service.logs import configure_logging
from tests.support.fakes import FakeEngine


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    engine = FakeEngine(step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0.01")))
    app = create_app(settings, engine=engine)
    return run_server(app, settings, host=settings.host, port=settings.port)


if __name__ == "__main__":
    raise SystemExit(main())
