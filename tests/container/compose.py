"""The Compose project under test: a copy of the compose files and the package source, parsed by
Docker Compose and by podman-compose, and run by podman-compose."""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.container.podman import Container, Host
from tests.support.service import REPO_ROOT, free_port

PRODUCTION = ("compose.yaml",)
DEVELOPMENT = ("compose.yaml", "compose.dev.yaml")
OVERRIDE = "test.override.yaml"
SERVICE = "ovis-image-api"

# Seconds for one podman-compose command; `stop` waits up to the 60 s grace period.
COMPOSE_TIMEOUT = 120

ComposeModel = dict[str, Any]


def copy_project(destination: Path) -> Path:
    """The files compose reads, and the source that development mode mounts, without a
    developer's own .env or caches. Readable by all: the image's non-root user reads them."""
    destination.mkdir(parents=True)
    for name in ("compose.yaml", "compose.dev.yaml", "Containerfile", ".env.example"):
        shutil.copy(REPO_ROOT / name, destination / name)
    shutil.copytree(
        REPO_ROOT / "ovis_service",
        destination / "ovis_service",
        ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"),
    )
    for path in (destination, *destination.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return destination


@dataclass
class ComposeProject:
    host: Host
    image: str
    directory: Path
    name: str

    @classmethod
    def copied_to(cls, host: Host, image: str, directory: Path) -> "ComposeProject":
        name = f"ovis-container-{os.getpid()}-{directory.name}"
        return cls(host, image, copy_project(directory), name)

    def write_env(self, text: str) -> None:
        env = self.directory / ".env"
        env.write_text(text)
        env.chmod(0o644)

    def remove_env(self) -> None:
        (self.directory / ".env").unlink(missing_ok=True)

    def docker_compose_config(self, files: tuple[str, ...]) -> ComposeModel:
        """`docker compose config`, run inside the image under test: no network, non-root."""
        result = self.host.podman(
            *("run", "--rm", "--network", "none", "--no-healthcheck"),
            *("--volume", f"{self.directory}:/project:ro"),
            *("--volume", f"{self.host.docker_compose}:/usr/local/bin/docker-compose:ro"),
            *("--workdir", "/project", "--env", "HOME=/tmp", "--entrypoint", "docker-compose"),
            self.image,
            *("--project-name", "ovis-service", *self.file_args(files), "config"),
            *("--format", "json"),
        )
        model: ComposeModel = json.loads(result.stdout)
        return model

    def podman_compose_config(self, files: tuple[str, ...]) -> ComposeModel:
        result = self.podman_compose(*self.file_args(files), "config")
        model: ComposeModel = yaml.safe_load(result.stdout)
        return model

    def podman_compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(
            [str(self.host.podman_compose), "-p", self.name, *args],
            cwd=self.directory,
            timeout=COMPOSE_TIMEOUT,
            check=check,
        )

    def podman_compose_dry_run_up(self) -> str:
        """What podman-compose would run for production, in its own words."""
        result = self.podman_compose(
            "--verbose", "--dry-run", *self.file_args(PRODUCTION), "up", "--no-build", "-d"
        )
        return result.stdout + result.stderr

    def write_override(self, port: int) -> None:
        """The tests' own override: the image just built, host networking on loopback, the tiny
        model, and no GPU (there is none here; the reservation itself is checked in parsing)."""
        (self.directory / OVERRIDE).write_text(
            f"""\
services:
  {SERVICE}:
    image: {self.image}
    network_mode: host
    ports: !reset []
    deploy: !reset {{}}
    environment:
      OVIS_MODEL: tiny
      OVIS_HOST: 127.0.0.1
      OVIS_PORT: "{port}"
      HF_HUB_OFFLINE: "1"
"""
        )

    def up(self, files: tuple[str, ...]) -> "ComposeRun":
        """`podman-compose up -d` with the tests' override, on a free loopback port."""
        port = free_port()
        self.write_override(port)
        self.compose(files, "up", "-d", "--no-build")
        ids = self.project_containers()
        assert len(ids) == 1, f"podman-compose started {ids}, expected one container"
        return ComposeRun(self, files, Container(self.host, ids[0], f"http://127.0.0.1:{port}"))

    def compose(
        self, files: tuple[str, ...], *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """podman-compose with `files` and the tests' override."""
        return self.podman_compose(*self.file_args((*files, OVERRIDE)), *args, check=check)

    def down(self, files: tuple[str, ...]) -> None:
        """`down -v`, then whatever it may have left behind."""
        self.compose(files, "down", "-v", check=False)
        self.remove_leftovers()

    def project_containers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.name}"
        return self.host.podman("ps", "-aq", "--filter", label).stdout.split()

    def remove_leftovers(self) -> None:
        for container in self.project_containers():
            self.host.podman("rm", "-f", "-t", "0", container, check=False)
        self.host.podman("pod", "rm", "-f", f"pod_{self.name}", check=False)
        for volume in self.host.podman("volume", "ls", "-q").stdout.split():
            if volume.startswith(f"{self.name}_"):
                self.host.podman("volume", "rm", "-f", volume, check=False)

    @staticmethod
    def file_args(files: tuple[str, ...]) -> list[str]:
        return [arg for name in files for arg in ("-f", name)]


@dataclass
class ComposeRun:
    """A started project: its one container, serving on loopback."""

    project: ComposeProject
    files: tuple[str, ...]
    container: Container

    def stop_and_check_exit(self) -> float:
        """`podman-compose stop`, which applies the stop_grace_period of compose.yaml."""
        return self.container.stop_and_check_exit(lambda: self.project.compose(self.files, "stop"))
