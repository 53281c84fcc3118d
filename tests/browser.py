"""Headless Chromium for the browser tests: find the browser, launch it through Playwright, or say why not.

The tests drive the system Chromium (Debian's `chromium`, which `make` installs as root) rather than a
browser downloaded by Playwright, so nothing is fetched at test time.
"""

from __future__ import annotations

import os
import shutil

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_path() -> str | None:
    """$CHROMIUM, else $BROWSER_PATH (kaleido's variable), else the first Chromium/Chrome on PATH."""
    for env in ("CHROMIUM", "BROWSER_PATH"):
        if os.environ.get(env):
            return os.environ[env]
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def require_browser():
    """(sync_playwright, chromium path), or skip the test naming what is missing and how to get it."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium/Chrome on PATH: install chromium (Debian: apt-get install chromium) or set CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    return sync_playwright, path


LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
