"""Runs inside the image under test, as its own user, with only the standard library and the
installed ovis_service; prints what the tests then check, as JSON.

    python in_image.py contents
    python in_image.py env-example PATH
"""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from ovis_service.config import Settings, env_name, load_settings

CACHE = Path("/root/.cache/huggingface")
DATA = Path(os.environ.get("OVIS_DATA_DIR", "data"))
# Set by the image, not the app's default.
IMAGE_VALUES = {"OVIS_HOST", "OVIS_DATA_DIR"}


def contents() -> dict[str, object]:
    return {
        "uid": os.geteuid(),
        "present": [p for p in ("/app/tests", "/app/.env", "/app/.git") if os.path.lexists(p)],
        "cache_entries": sorted(str(path) for path in CACHE.iterdir()),
        "cache_owned_by_app_user": CACHE.stat().st_uid == os.geteuid(),
        "data_dir": str(DATA),
        "data_entries": sorted(str(path) for path in DATA.iterdir()),
        "data_owned_by_app_user": DATA.stat().st_uid == os.geteuid(),
        "python": platform.python_version(),
        "uv": subprocess.run(
            ["/usr/local/bin/uv", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip(),
    }


def env_example(path: str) -> dict[str, object]:
    """Every setting the file shows, those it lacks, and each default it shows differently
    from the code."""
    shown = {}
    for line in Path(path).read_text().splitlines():
        match = re.fullmatch(r"#?(OVIS_[A-Z_]+)=(.*)", line.strip())
        if match:
            shown[match[1]] = match[2]
    parsed = load_settings({k: v for k, v in shown.items() if k not in IMAGE_VALUES})
    defaults = Settings()
    return {
        "shown": sorted(shown),
        "missing": sorted({env_name(f) for f in Settings.__struct_fields__} - set(shown)),
        "different_defaults": {
            env_name(f): [repr(getattr(parsed, f)), repr(getattr(defaults, f))]
            for f in Settings.__struct_fields__
            if getattr(parsed, f) != getattr(defaults, f)
        },
    }


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    facts = contents() if command == "contents" else env_example(*args)
    print(json.dumps(facts))
