"""`podman run` of the image with the tiny model: healthy, a PNG, and a clean stop.

The tests share one container, started once; the last one stops it.
"""

import os
from collections.abc import Iterator

import pytest

from tests.container.client import assert_generates_the_same_png_for_the_same_seed, check_health
from tests.container.podman import CACHE_VOLUME_PATH, GRACE, Container, Host
from tests.support.service import free_port

# The image build and the container start are fixtures with timeouts of their own.
pytestmark = [pytest.mark.container, pytest.mark.timeout(300, func_only=True)]


@pytest.fixture(scope="module")
def served(host: Host, image: str, figures: list[str]) -> Iterator[Container]:
    """The image's own command, with a named volume on the cache path. Host networking
    (container networks are not set up on every CI host), so the server is told to listen on
    loopback only: the image's OVIS_HOST=0.0.0.0 would expose it everywhere."""
    port = free_port()
    name, volume = f"ovis-container-{os.getpid()}", f"ovis-container-hf-{os.getpid()}"
    try:
        host.podman(
            *("run", "--detach", "--name", name, "--network", "host"),
            *("--stop-timeout", str(GRACE), "--volume", f"{volume}:{CACHE_VOLUME_PATH}"),
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
        host.podman("volume", "rm", "-f", volume, check=False)


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


def test_sigterm_stops_it_with_exit_code_0_within_the_grace_period(
    served: Container, figures: list[str]
) -> None:
    seconds = served.stop_and_check_exit()
    figures.append(f"podman run: stopped with exit code 0 in {seconds:.1f} s")
