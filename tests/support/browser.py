"""Debian's headless Chromium for browser tests, driven by Selenium; nothing downloads a browser.

Under CI (`CI` set) a missing browser fails the run; elsewhere the test is skipped with the
command that installs it.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

# Chromium phones home at start; on a closed network that is only noise and refused connections.
QUIET_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        message = f"{program} is missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextmanager
def headless_chromium(
    profile_dir: Path, *extra_flags: str, performance_log: bool = False
) -> Iterator[webdriver.Chrome]:
    """A fresh profile in `profile_dir`; console logs readable through `get_log("browser")`."""
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for flag in (*QUIET_FLAGS, *extra_flags, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    logs = {"browser": "ALL", **({"performance": "ALL"} if performance_log else {})}
    options.set_capability("goog:loggingPrefs", logs)
    browser = webdriver.Chrome(service=DriverService(require("chromedriver")), options=options)
    try:
        yield browser
    finally:
        browser.quit()
