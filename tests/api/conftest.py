"""One tiny-model service for the API tests, started once for the whole directory."""

from collections.abc import Iterator

import pytest

from tests.support.service import ServiceProcess, run_service


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with run_service(
        tmp_path_factory.mktemp("api"), env={"OVIS_WARMUP": "false", "OVIS_QUEUE_SIZE": "8"}
    ) as service:
        yield service
