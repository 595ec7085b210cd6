"""`podman run` of the image with the tiny model: healthy, a PNG, an async job that outlives a
restart, and a clean stop.

The tests share one container, started once; the last one stops it.
"""

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.container.client import (
    GENERATE_REQUEST,
    GENERATE_TIMEOUT,
    assert_generates_the_same_png_for_the_same_seed,
    check_health,
    decode_png,
    loopback_client,
)
from tests.container.podman import CACHE_VOLUME_PATH, DATA_VOLUME_PATH, GRACE, Container, Host
from tests.support.service import free_port

# The image build and the container start are fixtures with timeouts of their own.
pytestmark = [pytest.mark.container, pytest.mark.timeout(300, func_only=True)]


@pytest.fixture(scope="module")
def served(host: Host, image: str, figures: list[str]) -> Iterator[Container]:
    """The image's own command, with named volumes on the cache and job store paths. Host networking
    (container networks are not set up on every CI host), so the server is told to listen on
    loopback only: the image's OVIS_HOST=0.0.0.0 would expose it everywhere."""
    port = free_port()
    name, volume = f"ovis-container-{os.getpid()}", f"ovis-container-hf-{os.getpid()}"
    data = f"ovis-container-data-{os.getpid()}"
    try:
        host.podman(
            *("run", "--detach", "--name", name, "--network", "host"),
            *("--stop-timeout", str(GRACE), "--volume", f"{volume}:{CACHE_VOLUME_PATH}"),
            *("--volume", f"{data}:{DATA_VOLUME_PATH}"),
            *("--env", "OVIS_MODEL=tiny", "--env", "OVIS_HOST=127.0.0.1"),
            *("--env", f"OVIS_PORT={port}", "--env", "HF_HUB_OFFLINE=1"),
            image,
        )
        container = Container(host, name, f"http://127.0.0.1:{port}")
        _, seconds = container.wait_healthy()
        figures.append(f"podman run: healthy after {seconds:.0f} s")
        yield container
    finally:
        host.podman("rm", "-f", "-t", "0", name, check=False)
        host.podman("volume", "rm", "-f", volume, data, check=False)


def test_the_image_healthcheck_passes_and_health_says_the_model_is_loaded(
    served: Container,
) -> None:
    assert served.host.podman("healthcheck", "run", served.name, check=False).returncode == 0
    check_health(served.base_url)


def test_the_app_user_can_write_the_cache_volume(served: Container) -> None:
    probe = f"{CACHE_VOLUME_PATH}/.container-test"
    served.host.podman(
        *("exec", served.name, "sh", "-c"),
        f'test "$(id -u)" != 0 && touch {probe} && rm {probe}',
    )


def test_generate_answers_a_png_and_the_same_seed_the_same_bytes(
    served: Container, figures: list[str]
) -> None:
    generated = assert_generates_the_same_png_for_the_same_seed(served.base_url)
    figures.append(
        f"podman run: a 256x256 PNG of {len(generated.png)} bytes in {generated.seconds:.2f} s"
    )


def wait_for_job(base_url: str, job_id: str) -> dict[str, Any]:
    """Poll the job until it has finished; it must have succeeded."""
    deadline = time.monotonic() + GENERATE_TIMEOUT
    with loopback_client(base_url, timeout=10) as client:
        while True:
            job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                assert job["status"] == "succeeded", job
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.5)


def fetch_image(base_url: str, job: dict[str, Any]) -> bytes:
    # The job's URL names the host the request came in by, which is this loopback address.
    path = "/images/" + job["images"][0]["url"].rsplit("/images/", 1)[1]
    with loopback_client(base_url, timeout=10) as client:
        response = client.get(path)
    assert response.status_code == 200, response.text
    return response.content


def test_an_async_job_and_its_image_survive_a_restart(
    served: Container, figures: list[str]
) -> None:
    """The job store is on the data volume, written by the image's user: a finished job is
    still there, with the same image, after the container stops and starts again."""
    with loopback_client(served.base_url, timeout=GENERATE_TIMEOUT) as client:
        accepted = client.post(
            "/generate", json=GENERATE_REQUEST, headers={"Prefer": "respond-async"}
        )
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(served.base_url, accepted.json()["id"])
    png = fetch_image(served.base_url, job)
    decode_png(png)

    served.stop_and_check_exit()
    served.host.podman("start", served.name)
    # The log keeps the first run's lines: the second model_ready is this start's.
    _, seconds = served.wait_healthy(model_ready_lines=2)
    figures.append(f"podman run: healthy again {seconds:.0f} s after a restart")

    again = wait_for_job(served.base_url, job["id"])
    assert again["images"] == job["images"]
    assert fetch_image(served.base_url, again) == png


def test_sigterm_stops_it_with_exit_code_0_within_the_grace_period(
    served: Container, figures: list[str]
) -> None:
    seconds = served.stop_and_check_exit()
    figures.append(f"podman run: stopped with exit code 0 in {seconds:.1f} s")
