"""The image under test, built once per session with podman on the prepared host.

Run as root after the host setup, which is what `.ci/run` does:

    scripts/container-host-setup.sh
    uv run pytest -m container tests/container
"""

import os
import time
from collections.abc import Generator, Iterator

import pytest

from tests.container.compose import ComposeRun
from tests.container.podman import Container, Host
from tests.support.service import REPO_ROOT

IMAGE = "localhost/ovis-service:container-test"
# A fresh build downloads about 3 GB of wheels; a rebuild with the cache takes seconds.
BUILD_TIMEOUT = 1800
FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> list[str]:
    """Timings and sizes worth reading in a CI log, printed after the results."""
    return pytestconfig.stash.setdefault(FIGURES, [])


@pytest.fixture(scope="session")
def host(figures: list[str]) -> Host:
    prepared = Host.prepared()
    figures.append(prepared.podman("--version").stdout.strip())
    return prepared


@pytest.fixture(scope="session")
def image(host: Host, figures: list[str]) -> Iterator[str]:
    """Containerfile, built on the host's base image. `--format docker` keeps the HEALTHCHECK,
    which OCI images drop."""
    started = time.monotonic()
    host.run(
        [
            *("podman", "build", "--network", "host", "--format", "docker"),
            *("--build-arg", f"BASE_IMAGE={host.base_image}"),
            *("--volume", f"{host.ca_file}:{host.ca_in_build}:ro"),
            *("--file", "Containerfile", "--tag", IMAGE, "."),
        ],
        cwd=REPO_ROOT,
        timeout=BUILD_TIMEOUT,
    )
    size, base_size = host.image_size(IMAGE), host.image_size(host.base_image)
    figures.append(
        f"image built in {time.monotonic() - started:.0f} s on {host.base_image}: "
        f"{size / 1e6:.0f} MB ({size / 2**20:.0f} MiB), of which the base {base_size / 1e6:.0f} MB"
    )
    yield IMAGE
    if os.environ.get("CONTAINER_TEST_KEEP_IMAGE", "1") == "0":
        host.podman("rmi", "-f", IMAGE, check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the log of every container it used."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            container = value.container if isinstance(value, ComposeRun) else value
            if isinstance(container, Container):
                report.sections.append((f"podman logs {container.name}", container.log_tail()))
    return report


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    figures = config.stash.get(FIGURES, [])
    if figures:
        terminalreporter.section("container figures")
        for line in figures:
            terminalreporter.write_line(line)
