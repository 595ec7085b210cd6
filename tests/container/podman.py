"""Rootful podman, driven through `subprocess`, on the host that scripts/container-host-setup.sh
prepared; and one running container, with the checks every run of the image shares."""

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.container.client import Health, check_health

# Where the image keeps the Hugging Face cache, which compose puts on a named volume.
CACHE_VOLUME_PATH = "/root/.cache/huggingface"
# OVIS_DATA_DIR in the image: the job store.
DATA_VOLUME_PATH = "/data"
SETUP_COMMAND = "scripts/container-host-setup.sh (as root)"
# Seconds; the same as stop_grace_period in compose.yaml.
GRACE = 60
# Seconds to become healthy; the tiny model needs well under a minute.
HEALTH_TIMEOUT = 300
# podman wants systemd for its periodic healthcheck timers; where PID 1 is not systemd it logs
# this for each container and carries on. The tests run `podman healthcheck run` instead.
SYSTEMD_NOISE = "unable to get systemd connection"


def work_dir() -> Path:
    return Path(os.environ.get("CONTAINER_TEST_WORK_DIR", "/var/tmp/ovis-service-container"))


def unavailable(message: str) -> NoReturn:
    """Under CI (`CI` set) a host without podman is broken, so the tests fail; elsewhere they
    are skipped with the command that sets it up."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class CommandFailedError(AssertionError):
    """A podman or compose command that failed: a failed check, with its output."""


@dataclass(frozen=True)
class Host:
    """What the setup script made, as it wrote it to host.json."""

    containers_conf: Path
    base_image: str
    ca_file: Path
    ca_in_build: str
    podman_compose: Path
    podman_compose_version: str
    docker_compose: Path
    docker_compose_version: str

    @classmethod
    def prepared(cls) -> "Host":
        """The host, once it has rootful podman and everything the setup script makes."""
        if shutil.which("podman") is None:
            unavailable(f"podman is missing: run {SETUP_COMMAND}")
        if os.geteuid() != 0:
            unavailable("the container tests run rootful podman: run them as root")
        description = work_dir() / "host.json"
        if not description.is_file():
            unavailable(f"{description} is missing: run {SETUP_COMMAND}")
        fields = json.loads(description.read_text())
        host = cls(
            containers_conf=Path(fields["containers_conf"]),
            base_image=fields["base_image"],
            ca_file=Path(fields["ca_file"]),
            ca_in_build=fields["ca_in_build"],
            podman_compose=Path(fields["podman_compose"]),
            podman_compose_version=fields["podman_compose_version"],
            docker_compose=Path(fields["docker_compose"]),
            docker_compose_version=fields["docker_compose_version"],
        )
        if host.podman("image", "exists", host.base_image, check=False).returncode != 0:
            unavailable(f"base image {host.base_image} is missing: run {SETUP_COMMAND}")
        return host

    def environment(self) -> dict[str, str]:
        """The tests' environment, with the setup's containers.conf and without OVIS_* settings,
        which compose would otherwise interpolate into the files under test."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("OVIS_")}
        env["CONTAINERS_CONF"] = str(self.containers_conf)
        return env

    def run(
        self,
        command: list[str],
        *,
        cwd: Path | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailedError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{without_noise(result.stdout)[-4000:]}\n{without_noise(result.stderr)[-4000:]}"
            )
        return result

    def podman(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], timeout=timeout, check=check)

    def image_config(self, image: str) -> dict[str, Any]:
        output = self.podman("image", "inspect", "--format", "{{json .}}", image).stdout
        inspected: dict[str, Any] | list[dict[str, Any]] = json.loads(output)
        return inspected[0] if isinstance(inspected, list) else inspected

    def image_size(self, image: str) -> int:
        return int(self.podman("image", "inspect", "--format", "{{.Size}}", image).stdout)


def without_noise(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if SYSTEMD_NOISE not in line)


@dataclass
class Container:
    """A container of the image under test, serving on a loopback port of the host."""

    host: Host
    name: str
    base_url: str

    def inspect(self, template: str) -> str:
        return self.host.podman("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = self.host.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def count_in_logs(self, text: str) -> int:
        return self.logs().count(text)

    def wait_healthy(self, model_ready_lines: int = 1) -> tuple[Health, float]:
        """Wait until the container's own healthcheck (the image's HEALTHCHECK, or the compose
        healthcheck) passes and the log has `model_ready_lines` model_ready events (one per
        inference thread, and one more per reload); then /health must say the model is loaded.
        Returns the health and the seconds it took."""
        started = time.monotonic()
        while True:
            state = self.inspect("{{.State.Status}}")
            assert state == "running", (
                f"{self.name} is {state} before it became healthy:\n{self.log_tail()}"
            )
            # The log first: reading it is cheap, while each healthcheck starts a Python in the
            # container, which slows the start it is waiting for on a small machine.
            if (
                self.count_in_logs('"event": "model_ready"') >= model_ready_lines
                and self.host.podman("healthcheck", "run", self.name, check=False).returncode == 0
            ):
                break
            waited = time.monotonic() - started
            assert waited < HEALTH_TIMEOUT, (
                f"{self.name} not healthy after {HEALTH_TIMEOUT} s:\n{self.log_tail()}"
            )
            time.sleep(1)
        return check_health(self.base_url), time.monotonic() - started

    def stop_and_check_exit(self, stop: Callable[[], object] | None = None) -> float:
        """Stop it (by default `podman stop`, which sends the image's STOPSIGNAL, SIGTERM) and
        check the exit code 0 within the grace period; returns the seconds it took."""
        started = time.monotonic()
        if stop is None:
            self.host.podman("stop", "--time", str(GRACE), self.name, timeout=GRACE + 30)
        else:
            stop()
        seconds = time.monotonic() - started
        exit_code = self.inspect("{{.State.ExitCode}}")
        assert exit_code == "0", (
            f"{self.name}: exit code {exit_code} after SIGTERM, expected 0:\n{self.log_tail()}"
        )
        assert seconds < GRACE, f"{self.name}: stopping took {seconds:.1f} s, beyond {GRACE} s"
        return seconds

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])


IN_IMAGE_SCRIPT = Path(__file__).with_name("in_image.py")


def facts_from_image(host: Host, image: str, *args: str, volumes: tuple[str, ...] = ()) -> Any:
    """Run in_image.py in the image under test, as its user and without network."""
    result = host.podman(
        *("run", "--rm", "--network", "none", "--no-healthcheck"),
        *("--volume", f"{IN_IMAGE_SCRIPT}:/tmp/in_image.py:ro"),
        *(arg for volume in volumes for arg in ("--volume", volume)),
        *("--entrypoint", "python3", image, "/tmp/in_image.py", *args),
    )
    return json.loads(result.stdout)
