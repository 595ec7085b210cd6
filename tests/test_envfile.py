"""`.env` in the working directory: read as compose reads it, the real environment winning."""

from pathlib import Path

from ovis_service.envfile import apply_env_file


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_file_fills_in_what_the_environment_lacks(tmp_path: Path) -> None:
    env_file = write(
        tmp_path / ".env",
        "# a comment\nOVIS_MODEL=tiny\nexport OVIS_QUEUE_SIZE='3'\nHF_TOKEN=hf_secret\n",
    )
    environ: dict[str, str] = {"PATH": "/usr/bin"}
    loaded = apply_env_file(env_file, environ)
    assert environ == {
        "PATH": "/usr/bin",
        "OVIS_MODEL": "tiny",
        "OVIS_QUEUE_SIZE": "3",
        "HF_TOKEN": "hf_secret",
    }
    assert loaded is not None
    assert loaded.applied == {"OVIS_MODEL", "OVIS_QUEUE_SIZE", "HF_TOKEN"}
    assert loaded.origins()["OVIS_MODEL"] == str(env_file.resolve())


def test_the_real_environment_wins_over_the_file(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "OVIS_MODEL=tiny\nOVIS_PORT=9000\n")
    environ = {"OVIS_MODEL": "AIDC-AI/Ovis-Image-7B", "OVIS_PORT": ""}
    loaded = apply_env_file(env_file, environ)
    # Set, even to an empty value, means set: compose does the same.
    assert environ == {"OVIS_MODEL": "AIDC-AI/Ovis-Image-7B", "OVIS_PORT": ""}
    assert loaded is not None
    assert loaded.applied == frozenset()


def test_empty_values_in_the_file_are_left_unset(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "HF_TOKEN=\nOVIS_API_KEY\n#OVIS_WARMUP=false\n")
    environ: dict[str, str] = {}
    apply_env_file(env_file, environ)
    assert environ == {}


def test_no_file_changes_nothing(tmp_path: Path) -> None:
    environ = {"OVIS_MODEL": "tiny"}
    assert apply_env_file(tmp_path / ".env", environ) is None
    assert environ == {"OVIS_MODEL": "tiny"}
