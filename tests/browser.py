"""Headless Chromium for the web client's tests (selenium; Debian's `chromium` and `chromium-driver`).

One browser per test module (it costs ~2 s and a few hundred MB: the machine has 2 cores); each tab is a page of
the app, i.e. a device. Background tabs are throttled as in a desktop Chrome: chromedriver turns timer
throttling off by default, we turn it back on, and let intensive throttling (wake-ups once a minute) begin after
5 s hidden instead of 5 minutes, so a test can show the keepalive holds within its 60 s. Missing chromium skips
with the reason (fails with IM_REQUIRE_SERVICES=1, as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from services import require

# Where Debian puts them; PATH first.
_BROWSERS = ("chromium", "chromium-browser", "/usr/bin/chromium")
_DRIVERS = ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
# How long a browser-side condition may take: pushes and pulls take milliseconds; a reconnect after a cut
# waits for the backoff (1 s doubling: at most 8 s after a 5 s cut).
WAIT_S = 15.0
# Seconds hidden before a tab's timers wake at most once a minute (Chrome's default: 300).
INTENSIVE_THROTTLING_AFTER_S = 5
_DOCS_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "web"
# The README's screenshots are rewritten only on request (IM_SCREENSHOTS=1 python -m pytest tests/test_web_chat.py):
# times and device ids change at each run, and a test run should not leave the work tree changed.
SCREENSHOTS = _DOCS_SCREENSHOTS if os.environ.get("IM_SCREENSHOTS") == "1" else \
    Path(tempfile.gettempdir()) / f"im-screenshots-{os.getpid()}"


def chromium() -> tuple[str, str]:
    binary = next((shutil.which(b) for b in _BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in _DRIVERS if shutil.which(d)), None)
    import importlib.util
    require(importlib.util.find_spec("selenium") is not None, "selenium not installed (pip install -r requirements.txt)")
    require(binary is not None and driver is not None,
            "chromium or chromium-driver not installed (Debian: apt-get install chromium chromium-driver)")
    return binary, driver


def start_browser(width: int = 1000, height: int = 700):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver = chromium()
    o = webdriver.ChromeOptions()
    o.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}",
              f"--enable-features=IntensiveWakeUpThrottling:grace_period_seconds/{INTENSIVE_THROTTLING_AFTER_S}"):
        o.add_argument(a)
    # chromedriver adds these; a real browser throttles background tabs, so we take them out.
    o.add_experimental_option("excludeSwitches", ["disable-background-timer-throttling",
                                                  "disable-backgrounding-occluded-windows"])
    return webdriver.Chrome(service=Service(driver), options=o)


class Tab:
    """One tab of the browser: a page of the app. Every call first makes it the active tab (selenium acts on the
    current one), so the others are background tabs meanwhile."""

    def __init__(self, driver, url: str, new: bool = True):
        self.driver = driver
        if new:
            driver.switch_to.new_window("tab")
        self.handle = driver.current_window_handle
        driver.get(url)

    def on(self) -> "Tab":
        if self.driver.current_window_handle != self.handle:
            self.driver.switch_to.window(self.handle)
        return self

    def js(self, script: str, *args):
        return self.on().driver.execute_script(script, *args)

    def el(self, css: str):
        from selenium.webdriver.common.by import By
        return self.on().driver.find_element(By.CSS_SELECTOR, css)

    def type(self, css: str, text: str) -> None:
        e = self.el(css)
        e.clear()
        e.send_keys(text)

    def wait(self, script: str, timeout: float = WAIT_S, what: str = ""):
        """Poll a JS expression in this tab until truthy; returns its value (AssertionError naming ``what``)."""
        end = time.monotonic() + timeout
        while True:
            value = self.js(f"return ({script});")
            if value:
                return value
            if time.monotonic() > end:
                state = self.js("return [window.im ? [im.state, im.reason] : null, "
                                "document.getElementById('login-error').textContent]")
                raise AssertionError(f"timed out after {timeout} s waiting for {what or script}; "
                                     f"client state, login error: {state}")
            time.sleep(0.1)  # a poll interval, not a wait for an event

    def login(self, uid: str, password: str) -> "Tab":
        self.type("#login-uid", uid)
        self.type("#login-password", password + "\n")
        self.wait("window.im && im.state === 'online'", what=f"{uid} online")
        return self

    def open_chat(self, uid: str) -> None:
        self.type("#new-chat-uid", uid + "\n")
        self.wait(f"document.getElementById('conversation-title').textContent === {json.dumps(uid)}")

    def open(self, key: str) -> None:
        """Open a conversation from the list (a JS click: the list is redrawn whenever presence changes)."""
        self.wait(f"document.querySelector('#conversations button[data-key=\"{key}\"]')", what=f"conversation {key}")
        self.js(f"document.querySelector('#conversations button[data-key=\"{key}\"]').click()")

    def label(self, key: str) -> str:
        return self.js(f"return document.querySelector('#conversations button[data-key=\"{key}\"]')"
                       ".getAttribute('aria-label')")

    def send(self, text: str) -> None:
        self.el("#composer").send_keys(text + "\n")

    def shown(self) -> list[dict]:
        """The open conversation's messages as drawn: seq, msg_id, state, text."""
        return self.js("""return [...document.querySelectorAll('#messages li')].map(li => ({seq: li.dataset.seq ?
            Number(li.dataset.seq) : null, msg_id: li.dataset.msgId, state: li.dataset.state || null,
            text: (li.querySelector('.body') || li).textContent}));""")

    def conv(self, key: str) -> dict | None:
        return self.js("return im.store.convs[arguments[0]] || null;", key)

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.on().driver.save_screenshot(str(SCREENSHOTS / name))
