"""Headless Chromium for the viewer's test and benchmark, driven by Selenium with Debian's ``chromium`` and
``chromium-driver`` packages (no browser download): open a page at a viewport size, wait until it says
``document.title == "ready"``, read values, take screenshots of a rectangle::

    with Chromium() as browser:
        browser.open("file:///tmp/web/index.html?seed=0&yaw=0.2", width=256, height=256)
        png = browser.screenshot(0, 0, 256, 256)         # PNG bytes, device pixel ratio 1
        fps = browser.evaluate("window.gmpiViewer.fps")

Software GL (SwiftShader) needs flags a page must not rely on: they are passed here, for headless testing only.
"""

from __future__ import annotations

import base64
import os
import shutil
import time

SOFTWARE_GL_FLAGS = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables on PATH (``GMPI_CHROMIUM`` first), or None when either is missing."""
    browser = next((p for n in (os.environ.get("GMPI_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
                    if n and (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class PageError(RuntimeError):
    """The page reported an error (its title starts with ``error``) or never became ready."""


class Chromium:
    def __init__(self, software_gl: bool = True):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        found = find_chromium()
        if found is None:
            raise FileNotFoundError("Chromium and its driver are needed: apt-get install chromium chromium-driver")
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for flag in ("--headless=new", "--no-sandbox", "--hide-scrollbars", "--force-device-scale-factor=1",
                     "--force-color-profile=srgb", "--mute-audio", "--disable-extensions", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     *(SOFTWARE_GL_FLAGS if software_gl else ())):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(found[1]), options=options)

    def evaluate(self, expression: str):
        return self.driver.execute_script(f"return ({expression});")

    def open(self, url: str, width: int, height: int, timeout: float = 60.0, ready: str = "ready") -> None:
        """Load ``url`` in a ``width`` x ``height`` viewport (device pixel ratio 1) and wait until its title is
        ``ready``; a title starting with ``error`` raises :class:`PageError` with it."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.driver.get(url)
        deadline, title = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            title = self.driver.title or ""
            if title == ready:
                return
            if title.lower().startswith("error"):
                raise PageError(f"{url}: {title}")
            time.sleep(0.05)
        raise PageError(f"{url} was not {ready!r} after {timeout:.0f} s (title {title!r}); console: {self.console()}")

    def console(self) -> list[str]:
        try:
            return [e.get("message", "") for e in self.driver.get_log("browser")]
        except Exception:  # a driver without the log endpoint
            return []

    def screenshot(self, x: int, y: int, width: int, height: int) -> bytes:
        """PNG bytes of a page rectangle in CSS pixels (= device pixels here)."""
        r = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "fromSurface": True,
            "clip": {"x": x, "y": y, "width": width, "height": height, "scale": 1}})
        return base64.b64decode(r["data"])

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
