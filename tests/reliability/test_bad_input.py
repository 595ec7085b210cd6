"""Section 1, bad input: schemathesis against the service's own OpenAPI schema, then hand-made
requests that no schema describes. The tiny real pipeline answers the valid ones."""

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from tests.reliability.figures import FigureBook
from tests.support.service import ServiceProcess, run_service

# Small limits keep each valid request cheap (a 256-320 px image in 1-2 steps), so the run
# spends its time on many requests rather than on a few large images.
FUZZ_ENV = {"OVIS_MAX_STEPS": "2", "OVIS_MAX_IMAGE_SIZE": "320", "OVIS_QUEUE_SIZE": "2"}
EXAMPLES_PER_MODE = 150
MIN_REQUESTS = 300

TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with run_service(tmp_path_factory.mktemp("fuzz"), env=FUZZ_ENV) as service:
        yield service


@pytest.fixture(scope="module")
def api_schema(fuzz_service: ServiceProcess) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{fuzz_service.base_url}/schema/openapi.json")
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=EXAMPLES_PER_MODE,
    )
    return schema


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_no_server_error_and_match_the_schema(
    case: schemathesis.Case,
) -> None:
    response = case.call(timeout=60)
    TALLY[f"{case.method} {case.path} {response.status_code}"] += 1
    # Every built-in check: no 5xx, status code, content type, headers and body as documented,
    # valid data accepted and invalid data refused.
    case.validate_response(response)


def test_the_fuzz_run_was_large_enough(figures: FigureBook, fuzz_service: ServiceProcess) -> None:
    total = sum(TALLY.values())
    if total == 0:
        pytest.skip("the schemathesis test did not run in this session")
    assert total >= MIN_REQUESTS, TALLY
    server_errors = {key: count for key, count in TALLY.items() if key.endswith(tuple("5"))}
    figures.add("1 bad input", "schemathesis requests", total)
    figures.add("1 bad input", "responses by status", dict(sorted(TALLY.items())))
    figures.add("1 bad input", "5xx responses", sum(server_errors.values()))
