"""Both Compose modes, run for real by podman-compose with the tests' override (the image just
built, host networking on loopback, the tiny model, no GPU).

Each mode's tests share one started project; the last test of each stops it.
"""

import time
from collections.abc import Iterator

import pytest

from tests.container.client import assert_generates_the_same_png_for_the_same_seed, check_health
from tests.container.compose import DEVELOPMENT, PRODUCTION, ComposeProject, ComposeRun
from tests.container.podman import Host

# The image build and the project starts are fixtures with timeouts of their own.
pytestmark = [pytest.mark.container, pytest.mark.timeout(300, func_only=True)]

# Seconds from a source change to the restarted server.
RELOAD_TIMEOUT = 60
# uvicorn's reloader logs this once per server process it starts.
SERVER_STARTED = "Started server process"
MODEL_READY = '"event": "model_ready"'


@pytest.fixture(scope="module")
def production(
    host: Host, image: str, tmp_path_factory: pytest.TempPathFactory, figures: list[str]
) -> Iterator[ComposeRun]:
    """OVIS_WORKERS=2 in .env: two inference threads in the one process (two pipelines on the
    one device)."""
    directory = tmp_path_factory.mktemp("production") / "project"
    project = ComposeProject.copied_to(host, image, directory)
    project.write_env("OVIS_WORKERS=2\n")
    try:
        run = project.up(PRODUCTION)
        _, seconds = run.container.wait_healthy(model_ready_lines=2)
        figures.append(f"podman-compose, production: healthy after {seconds:.0f} s")
        yield run
    finally:
        project.down(PRODUCTION)


def test_production_takes_the_worker_count_from_the_env_file(production: ComposeRun) -> None:
    command = production.container.inspect("{{json .Config.Cmd}}")
    assert command == '["ovis-service","--workers","2"]'


def test_production_is_healthy_with_two_inference_threads(production: ComposeRun) -> None:
    container = production.container
    # The compose healthcheck, which podman-compose turned into the container's own.
    assert container.host.podman("healthcheck", "run", container.name, check=False).returncode == 0
    assert len(check_health(container.base_url)["devices"]) == 2


def test_production_answers_a_png(production: ComposeRun) -> None:
    assert_generates_the_same_png_for_the_same_seed(production.container.base_url)


def test_production_stops_with_exit_code_0(production: ComposeRun, figures: list[str]) -> None:
    seconds = production.stop_and_check_exit()
    figures.append(f"podman-compose, production: stopped with exit code 0 in {seconds:.1f} s")


@pytest.fixture(scope="module")
def development(
    host: Host, image: str, tmp_path_factory: pytest.TempPathFactory, figures: list[str]
) -> Iterator[ComposeRun]:
    directory = tmp_path_factory.mktemp("development") / "project"
    project = ComposeProject.copied_to(host, image, directory)
    try:
        run = project.up(DEVELOPMENT)
        _, seconds = run.container.wait_healthy()
        figures.append(f"podman-compose, development: healthy after {seconds:.0f} s")
        yield run
    finally:
        project.down(DEVELOPMENT)


def test_development_mounts_the_source(development: ComposeRun) -> None:
    mounts = development.container.inspect(
        "{{range .Mounts}}{{.Source}}:{{.Destination}} {{end}}"
    ).split()
    assert f"{development.project.directory}/ovis_service:/app/ovis_service" in mounts


def test_development_reloads_on_a_source_change(
    development: ComposeRun, figures: list[str]
) -> None:
    container = development.container
    ready_before = container.count_in_logs(MODEL_READY)
    with (development.project.directory / "ovis_service" / "__init__.py").open("a") as source:
        source.write("# changed by the container tests\n")
    changed = time.monotonic()
    while container.count_in_logs(SERVER_STARTED) < 2:
        waited = time.monotonic() - changed
        assert waited < RELOAD_TIMEOUT, f"no restart within {RELOAD_TIMEOUT} s of a change"
        time.sleep(1)
    _, seconds = container.wait_healthy(model_ready_lines=ready_before + 1)
    figures.append(f"podman-compose, development: reloaded and healthy again after {seconds:.0f} s")


def test_development_stops_with_exit_code_0(development: ComposeRun, figures: list[str]) -> None:
    seconds = development.stop_and_check_exit()
    figures.append(f"podman-compose, development: stopped with exit code 0 in {seconds:.1f} s")
