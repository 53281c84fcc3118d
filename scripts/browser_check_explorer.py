"""One-time real-browser check of notebook 06: in JupyterLab (headless Chromium), dragging the budget
slider regenerates the text. NOT part of CI or `make test`; run it by hand:

    METABOLIC_ASSETS=/work/shared/data HF_HUB_OFFLINE=1 .venv/bin/python scripts/browser_check_explorer.py

It needs the smoke artefacts notebook 06 reads (run `python -m metabolic run --profile smoke` first),
`/usr/bin/chromium` (or $CHROMIUM) and `websocket-client`. What it does:
1. starts `jupyter lab` on 127.0.0.1 (random port, random token, app exposed to the page as
   `window.jupyterapp`) in a temporary copy of notebook 06;
2. starts headless Chromium with remote debugging on 127.0.0.1 and opens the notebook;
3. runs all cells through JupyterLab's command registry and waits for the explorer's status line
   (`data-renders="1"`);
4. drags the budget slider's handle with real mouse events (Chrome DevTools Protocol) and waits for
   `data-renders="2"` with a changed budget in the status line.
Exit status 0 and "PASS" when the slider regenerated; otherwise "FAIL" with what was seen.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1400,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_js(self, expression: str, timeout_s: float, what: str):
        end = time.time() + timeout_s
        while time.time() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


STATUS_JS = ("(() => { const s = [...document.querySelectorAll('[data-renders]')]; "
             "return s.length ? s[s.length - 1].getAttribute('data-renders') + '|' + s[s.length - 1].textContent : ''; })()")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="explorer-browser-"))
    shutil.copy(ROOT / "notebooks" / "06_budget_explorer.ipynb", work / "06_budget_explorer.ipynb")
    env = {**os.environ, "METABOLIC_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}
    port, token = free_port(), secrets.token_hex(16)
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={work}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=open(work / "lab.log", "w"))
    chrome = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api?token={token}", 60)
        dbg = free_port()
        chrome = subprocess.Popen([CHROMIUM, *FLAGS, f"--remote-debugging-port={dbg}", "--remote-debugging-address=127.0.0.1",
                                   f"--user-data-dir={work / 'chrome'}", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{dbg}/json/version", 30)
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{dbg}/json").read())
        page = next(p for p in pages if p.get("type") == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=f"http://127.0.0.1:{port}/lab/tree/06_budget_explorer.ipynb?token={token}")
        cdp.wait_js("!!(window.jupyterapp && document.querySelector('.jp-Notebook'))", 90, "JupyterLab and the notebook")
        # Accept a kernel-selection dialog if one shows, then wait for the session to be ready.
        end = time.time() + 120
        while time.time() < end:
            cdp.js("(() => { const b = document.querySelector('.jp-Dialog .jp-mod-accept'); if (b) b.click(); })()")
            state = cdp.js("(() => { const w = window.jupyterapp.shell.currentWidget; const k = w && w.sessionContext && "
                           "w.sessionContext.session && w.sessionContext.session.kernel; return k ? k.status : 'none'; })()")
            if state == "idle":
                break
            time.sleep(1)
        print("kernel:", state)
        cdp.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        first = cdp.wait_js(STATUS_JS, 240, "the first render of the explorer")
        print("after run-all:", first[:200])
        box = cdp.wait_js("(() => { const h = document.querySelector('.widget-slider .noUi-handle'); if (!h) return null; "
                          "h.scrollIntoView({block: 'center'}); const r = h.getBoundingClientRect(); "
                          "const t = h.closest('.noUi-target').getBoundingClientRect(); "
                          "return [r.x + r.width / 2, r.y + r.height / 2, t.x + t.width * 0.9]; })()", 30, "the budget slider")
        x, y, x_to = box
        cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        cdp.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        for i in range(1, 11):
            cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + (x_to - x) * i / 10, y=y, button="left", buttons=1)
            time.sleep(0.05)
        cdp.call("Input.dispatchMouseEvent", type="mouseReleased", x=x_to, y=y, button="left", clickCount=1)
        end = time.time() + 120
        second = first
        while time.time() < end:
            second = cdp.js(STATUS_JS) or ""
            if second.split("|")[0] != first.split("|")[0]:
                break
            time.sleep(0.5)
        print("after the drag:", second[:200])
        ok = second.split("|")[0] != first.split("|")[0] and second.split("|")[1] != first.split("|")[1]
        print("PASS: moving the budget slider regenerated the text" if ok else "FAIL: no new render after the drag")
        return 0 if ok else 1
    finally:
        if chrome is not None:
            chrome.terminate()
        lab.terminate()
        for proc in (chrome, lab):
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
