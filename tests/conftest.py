import os
from pathlib import Path

import pytest

# No test may reach the hub: the tiny model is built in memory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in a directory of its own, so an app built in-process keeps its job store
    (`OVIS_DATA_DIR`, `data` by default) there, never in the checkout or another test's."""
    monkeypatch.chdir(tmp_path)
