"""Read `.env` from the working directory the way compose does: the real environment wins.

python-dotenv does the parsing (quotes, comments, `export`, `${VAR}`), so the same file works
for `uv run ovis-service`, for compose and for the container. Every name is applied, not only
`OVIS_*`, so `HF_TOKEN` in the file reaches the Hugging Face hub library too.
"""

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

ENV_FILE = Path(".env")


@dataclass(frozen=True)
class EnvFile:
    path: Path
    applied: frozenset[str]  # the names this file set; the environment had none of them

    def origins(self) -> dict[str, str]:
        """Variable -> file, so that a settings error can say where a bad value was written."""
        return {name: str(self.path) for name in self.applied}


def apply_env_file(
    path: Path = ENV_FILE, environ: MutableMapping[str, str] | None = None
) -> EnvFile | None:
    """Copy the file's variables into `environ` (the process environment by default), leaving
    every variable that is already set alone. None when there is no such file."""
    if not path.is_file():
        return None
    environ = os.environ if environ is None else environ
    applied: set[str] = set()
    for name, value in dotenv_values(path).items():
        # A bare `NAME` or `NAME=` means "not set", as an empty variable does for the settings.
        if not value or name in environ:
            continue
        environ[name] = value
        applied.add(name)
    return EnvFile(path=path.resolve(), applied=frozenset(applied))
