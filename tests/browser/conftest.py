"""Browser fixtures: Debian's Chromium driven by Playwright (sync API), one browser for this
package and a fresh context (no cookies: a new guest) for each test.

No `playwright install`: the system Chromium is launched directly. Without the `playwright`
package or the Chromium binary the tests skip, saying which is missing — unless
`KAMENG_BROWSER_TESTS=required` (set it in CI), where a missing browser is an error instead.

A test that fails in its body leaves a full-page screenshot of the page in its `tmp_path`; the
path is printed and added to the failure report (section "browser").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("KAMENG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000  # any single action or expectation

_PAGE = pytest.StashKey[tuple[Any, Path]]()


def _unavailable(reason: str) -> None:
    if os.environ.get("KAMENG_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """The launched browser; it and the Playwright driver close after the last browser test."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("the `playwright` package is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A page in its own browser context, closed after the test (and its screenshot)."""
    context = chromium.new_context(locale="zh-CN", viewport={"width": 1000, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        request.node.stash[_PAGE] = (page, tmp_path)
        yield page
    finally:
        if _PAGE in request.node.stash:
            del request.node.stash[_PAGE]
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure in the test body (the page is still open then), save a screenshot."""
    report = yield
    if report.when == "call" and report.failed and _PAGE in item.stash:
        page, tmp_path = item.stash[_PAGE]
        shot = tmp_path / "failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            note = f"screenshot of the failing page: {shot} (page at {page.url})"
        except Exception as exc:  # the page may be gone; the report must still come out
            note = f"no screenshot could be taken: {exc!r}"
        print(f"\n{note}")
        report.sections.append(("browser", note))
    return report
