"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): standard library
only, no websocket client, no browser download (Debian's ``chromium`` package). Used by the viewer's test and
benchmark to open a page, wait until it says ``document.title == "ready"``, read values and take screenshots::

    with Chromium() as browser:
        browser.open("file:///tmp/web/index.html?seed=0&yaw=0.2", width=256, height=256)
        png = browser.screenshot(0, 0, 256, 256)         # PNG bytes of that rectangle, device pixel ratio 1
        fps = browser.evaluate("window.gmpiViewer.fps")

Software GL (SwiftShader) needs flags a page must not rely on: they are passed here, for headless testing only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
SOFTWARE_GL_FLAGS = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist")


def find_chromium() -> str | None:
    """A Chromium/Chrome executable on PATH (``GMPI_CHROMIUM`` first), or None."""
    for name in (os.environ.get("GMPI_CHROMIUM"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    return None


class PageError(RuntimeError):
    """The page reported an error (its title starts with ``error``) or never became ready."""


class Chromium:
    """One headless browser process with one page, talked to over fds 3 (commands) and 4 (replies)."""

    def __init__(self, executable: str | None = None, software_gl: bool = True, extra_flags: tuple[str, ...] = ()):
        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError("no Chromium found on PATH: install Debian's package (apt-get install chromium) "
                                    "or point GMPI_CHROMIUM at a chromium/chrome executable")
        self.profile = tempfile.TemporaryDirectory(prefix="gmpi-chromium-")
        to_browser, self._cmd = os.pipe()  # browser reads commands on its fd 3
        self._reply, from_browser = os.pipe()  # and writes replies on its fd 4
        flags = ["--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}", "--no-first-run",
                 "--no-default-browser-check", "--hide-scrollbars", "--force-device-scale-factor=1",
                 "--force-color-profile=srgb", "--mute-audio", "--disable-extensions",
                 "--disable-background-networking",
                 "--disable-renderer-backgrounding", "--disable-background-timer-throttling"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        flags += list(SOFTWARE_GL_FLAGS if software_gl else ()) + list(extra_flags)

        def wire_fds():  # in the child: our pipe ends become fds 3 and 4 (moved above 4 first: no overlap)
            import fcntl

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([exe, *flags, "about:blank"], preexec_fn=wire_fds, pass_fds=(3, 4),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._next_id, self.session = b"", 0, None
        self.events: list[dict] = []
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    # ------------------------------------------------------------------------------------------ protocol
    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reply], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._reply, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                raise RuntimeError(f"Chromium closed its DevTools pipe. {err}")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    # ------------------------------------------------------------------------------------------ page
    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise PageError(f"{expression}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def open(self, url: str, width: int, height: int, timeout: float = 60.0, ready: str = "ready") -> None:
        """Load ``url`` in a ``width`` x ``height`` viewport (device pixel ratio 1) and wait until its title is
        ``ready``; a title starting with ``error`` raises :class:`PageError` with it."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        title = ""
        while time.monotonic() < deadline:
            title = self.evaluate("document.title") or ""
            if title == ready:
                return
            if title.lower().startswith("error"):
                raise PageError(f"{url}: {title}")
            time.sleep(0.05)
        raise PageError(f"{url} was not {ready!r} after {timeout:.0f} s (title {title!r}); console: {self.console()}")

    def console(self) -> list[str]:
        """Console messages and exceptions so far (for error reports)."""
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(e["params"]["exceptionDetails"].get("exception", {}).get("description", "exception"))
        return out

    def screenshot(self, x: int, y: int, width: int, height: int) -> bytes:
        """PNG bytes of a page rectangle in CSS pixels (= device pixels here)."""
        r = self.call("Page.captureScreenshot", format="png", fromSurface=True,
                      clip=dict(x=x, y=y, width=width, height=height, scale=1))
        return base64.b64decode(r["data"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._cmd, self._reply):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.stderr.close()
        self.profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
