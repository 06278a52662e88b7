"""A real Chromium for the web page's tests, driven by Playwright.

Playwright's own browser download needs the internet, so the tests use the operating system's
Chromium (Debian's ``chromium`` package, which .ci/run installs) through ``executable_path``.
Without one, the browser tests are skipped with a sentence saying how to get it; under CI they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers import unavailable

CHROMIUM = os.environ.get("PARTYCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
HOW_TO_GET_ONE = (
    f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` (Debian; .ci/run does this), "
    "or point PARTYCHAT_CHROMIUM at a Chromium binary, and `pip install -e .[dev]` for Playwright"
)


def chromium_or_skip() -> str:
    """The browser's path; without one the test is skipped, or fails under CI."""
    path = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    if not path or not os.access(path, os.X_OK):
        unavailable(HOW_TO_GET_ONE)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable(HOW_TO_GET_ONE)
    return path


class Browser:
    """One Chromium with a fresh profile; remembers every dialog and script error any page raised."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.dialogs: list[str] = []
        self.errors: list[str] = []

    def open(self, url: str) -> Any:
        page = self.context.new_page()
        page.set_default_timeout(60_000)

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.goto(url)
        return page


def expect(target: Any) -> Any:
    """Playwright's ``expect``, which waits for what a person would see (imported late, like Playwright itself)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@contextmanager
def chromium(profile: Path) -> Iterator[Browser]:
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=executable, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 800}, accept_downloads=True,
        )
        try:
            yield Browser(context)
        finally:
            context.close()
