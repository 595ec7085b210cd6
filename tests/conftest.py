import os

# No test may reach the hub: the tiny model is built in memory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test runs in a directory of its own, so an app built in-process keeps its job store
    (`OVIS_DATA_DIR`, `data` by default) there, never in the checkout or another test's."""
    monkeypatch.chdir(tmp_path)
    yield
