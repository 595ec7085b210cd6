"""The image as built: its build context, its configuration and its contents."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.container.podman import CACHE_VOLUME_PATH, DATA_VOLUME_PATH, Host, facts_from_image
from tests.support.service import REPO_ROOT

# The image build is a fixture with a timeout of its own.
pytestmark = [pytest.mark.container, pytest.mark.timeout(300, func_only=True)]

SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OVIS_API_KEY", "OVIS_API_KEYS")


@pytest.fixture(scope="module")
def build_context(host: Host, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Every path in the build context, as the ignore file (.containerignore, a link to
    .dockerignore) leaves it: a throwaway image copies the context, and `find` lists it."""
    probe = tmp_path_factory.mktemp("context") / "Containerfile"
    probe.write_text(f"FROM {host.base_image}\nCOPY . /context\n")
    build = [
        *("podman", "build", "--network", "none", "--no-cache", "--quiet"),
        *("--file", str(probe), "."),
    ]
    image_id = host.run(build, cwd=REPO_ROOT).stdout.split()[-1]
    try:
        yield host.podman(
            *("run", "--rm", "--network", "none", "--entrypoint", "find", image_id),
            *("/context", "-mindepth", "1", "-printf", "%P\\n"),
        ).stdout.split()
    finally:
        host.podman("rmi", "-f", image_id, check=False)


def test_the_build_context_holds_only_what_the_image_needs(build_context: list[str]) -> None:
    top_level = {Path(path).parts[0] for path in build_context}
    # So no .venv (GBs), .git, tests or .env with its secrets.
    assert top_level == {"pyproject.toml", "uv.lock", "README.md", "ovis_service"}
    assert "ovis_service/__init__.py" in build_context
    caches = [p for p in build_context if "__pycache__" in p or p.endswith((".pyc", ".pyo"))]
    assert not caches


@pytest.fixture(scope="module")
def config(host: Host, image: str) -> dict[str, Any]:
    inspected = host.image_config(image)
    config: dict[str, Any] = inspected["Config"]
    # Docker keeps the healthcheck in the config, Podman next to it.
    config.setdefault("Healthcheck", inspected.get("Healthcheck"))
    return config


@pytest.fixture(scope="module")
def environment(config: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.get("Env") or [])


def test_the_image_runs_as_a_user_other_than_root(config: dict[str, Any]) -> None:
    assert config.get("User") not in (None, "", "0", "root", "0:0")


def test_the_image_exposes_port_4201(config: dict[str, Any]) -> None:
    assert "4201/tcp" in (config.get("ExposedPorts") or {})


def test_the_image_stops_with_sigterm(config: dict[str, Any]) -> None:
    assert config.get("StopSignal") in ("SIGTERM", "15")


def test_the_image_checks_its_health_on_health(config: dict[str, Any]) -> None:
    healthcheck = config.get("Healthcheck") or {}
    assert "/health" in " ".join(healthcheck.get("Test") or []), healthcheck


def test_the_image_environment(environment: dict[str, str]) -> None:
    assert environment.get("HF_HOME") == CACHE_VOLUME_PATH
    assert environment.get("TRANSFORMERS_CACHE") == CACHE_VOLUME_PATH
    assert environment.get("PYTHONUNBUFFERED") == "1"
    # Inside a container the service must listen beyond its own loopback.
    assert environment.get("OVIS_HOST") == "0.0.0.0"
    # Absolute: the default, `data`, would be under /app, which the app user cannot write.
    assert environment.get("OVIS_DATA_DIR") == DATA_VOLUME_PATH


def test_no_secret_is_baked_into_the_image(environment: dict[str, str]) -> None:
    assert not [name for name in SECRETS if name in environment]


@pytest.fixture(scope="module")
def contents(host: Host, image: str, figures: list[str]) -> dict[str, Any]:
    facts: dict[str, Any] = facts_from_image(host, image, "contents")
    figures.append(f"in the image: Python {facts['python']}, {facts['uv']}")
    return facts


def test_the_image_holds_no_tests_env_file_or_git(contents: dict[str, Any]) -> None:
    assert contents["present"] == []


def test_no_weights_are_baked_in_and_the_app_user_owns_the_cache(
    contents: dict[str, Any],
) -> None:
    assert contents["cache_entries"] == []
    assert contents["uid"] != 0
    assert contents["cache_owned_by_app_user"]


def test_the_job_store_directory_is_empty_and_the_app_user_owns_it(
    contents: dict[str, Any],
) -> None:
    """A new named volume on it starts as this directory, owner included: no chown needed."""
    assert contents["data_dir"] == DATA_VOLUME_PATH
    assert contents["data_entries"] == []
    assert contents["data_owned_by_app_user"]
