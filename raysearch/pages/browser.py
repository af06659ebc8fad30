"""Headless Chromium for looking at pages: a screenshot, or the DOM after the page's scripts ran.

Used by the tests (every page is opened in a real browser) and to make the README's screenshots.
With `offline=True` every host name but 127.0.0.1 fails to resolve, so a page that would fetch
anything from the internet (a CDN script, a web font) shows it by breaking.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

CHROMIUM_ENV = "RAYSEARCH_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium's resolver answers NOTFOUND for every name but the loopback service under test.
OFFLINE_RULES = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def chromium_path() -> str | None:
    """The Chromium executable: $RAYSEARCH_CHROMIUM, else the first of CANDIDATES on PATH; None
    when there is none."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if os.path.exists(given) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not finish in time."""


def run_chromium(url: str, *, screenshot: str | None = None, dump_dom: bool = False,
                 window: tuple[int, int] = (1280, 900), offline: bool = True, budget_ms: int = 5000,
                 timeout_s: float = 120.0) -> str:
    """Open `url` in headless Chromium and return the DOM it ends with (`dump_dom`) or "" (a
    screenshot only, written to the PNG file `screenshot`).

    `budget_ms`: virtual time the page gets before the DOM is read or the picture taken: timers,
    fetches and their scripts run within it. Raises BrowserError when Chromium is missing, exits
    with an error or does not finish within `timeout_s`.
    """
    exe = chromium_path()
    if exe is None:
        raise BrowserError(f"no Chromium found (install Debian's `chromium`, or set ${CHROMIUM_ENV})")
    if not (screenshot or dump_dom):
        raise ValueError("ask for a screenshot, the DOM, or both")
    with tempfile.TemporaryDirectory(prefix="raysearch-chromium-") as profile:
        args = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={budget_ms}",
        ]
        if offline:
            args.append(f"--host-resolver-rules={OFFLINE_RULES}")
        if screenshot:
            args.append(f"--screenshot={os.path.abspath(screenshot)}")
        if dump_dom:
            args.append("--dump-dom")
        try:
            done = subprocess.run(args + [url], capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"Chromium did not finish {url} within {timeout_s:g} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise BrowserError(f"Chromium exited with {done.returncode} on {url}: {tail}")
    if screenshot and not os.path.exists(screenshot):
        raise BrowserError(f"Chromium wrote no screenshot of {url}")
    return done.stdout if dump_dom else ""
