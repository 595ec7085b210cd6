"""Run the real app and server around a `FakeEngine`: `python -m tests.support.fake_service`.

Settings come from `OVIS_*` as usual; `FAKE_STEP_SECONDS` sets how long each step takes and
`FAKE_ENGINES` how many inference threads (one fake engine each) the pool has, and
`FAKE_HOLD_FILE` the file whose creation releases `held...` prompts.
"""

import os
from pathlib import Path

from ovis_service.app import create_app
from ovis_service.cli import run_server
from ovis_service.config import load_settings
from ovis_service.logs import configure_logging
from tests.support.fakes import FakeEngine


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.01"))
    count = int(os.environ.get("FAKE_ENGINES", "1"))
    hold = os.environ.get("FAKE_HOLD_FILE")
    engines = [
        FakeEngine(step_seconds=step_seconds, hold_file=Path(hold) if hold else None)
        for _ in range(count)
    ]
    app = create_app(settings, engines=engines)
    return run_server(app, settings, host=settings.host, port=settings.port)


if __name__ == "__main__":
    raise SystemExit(main())
