"""A real browser for the dashboard tests: Debian's headless Chromium driven over the DevTools
protocol on a pipe (--remote-debugging-pipe: no port, no websocket library, nothing but the
standard library).

Usage: browser.py URL [WIDTHxHEIGHT]
Opens URL, prints READY once the page has loaded, then reads commands from stdin, one per line:
  wait SECONDS JS   evaluate JS every 100 ms until it is truthy; prints `ok JSON` or `timeout JSON`
  eval JS           prints `= JSON`
  shot PATH         saves a PNG screenshot of the whole page; prints `shot PATH`
The Rust tests (tests/all/dashboard.rs) assert on what it prints.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

URL = sys.argv[1]
WIDTH, HEIGHT = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1400x1000").split("x"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"

profile = tempfile.mkdtemp(prefix="updraft-browser-")
# The DevTools pipe is the child's fds 3 (commands in) and 4 (replies out).
to_child_r, to_child_w = os.pipe()
from_child_r, from_child_w = os.pipe()


def child_fds():
    # Copies above 4 first, so that neither dup2 overwrites the other's source (the pipes may
    # well be fds 3 to 6 themselves); dup2 onto the same number would keep close-on-exec.
    r, w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
    os.dup2(r, 3)
    os.dup2(w, 4)
    os.set_inheritable(3, True)
    os.set_inheritable(4, True)


# The flags keep Chromium off the network (this machine has none outside loopback) and quiet.
proc = subprocess.Popen(
    [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        "about:blank",
    ],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=None if os.environ.get("BROWSER_DEBUG") else subprocess.DEVNULL,
    preexec_fn=child_fds,
    # Python's own descriptors are not inheritable (PEP 446); only the dup2'ed 3 and 4 pass.
    close_fds=False,
)
os.close(to_child_r)
os.close(from_child_w)
reader = os.fdopen(from_child_r, "rb")
writer = os.fdopen(to_child_w, "wb")
next_id = 0
buffered = b""


def send(method, params=None, session=None):
    """Sends one command and returns its result, skipping events."""
    global next_id, buffered
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    writer.write(json.dumps(msg).encode() + b"\0")
    writer.flush()
    while True:
        while b"\0" not in buffered:
            chunk = reader.read1(65536)
            if not chunk:
                raise SystemExit("chromium closed the DevTools pipe")
            buffered += chunk
        raw, buffered = buffered.split(b"\0", 1)
        reply = json.loads(raw)
        if reply.get("id") == next_id:
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})


def main():
    target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    send("Page.enable", session=session)
    send("Runtime.enable", session=session)
    send("Emulation.setDeviceMetricsOverride",
         {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
    send("Page.navigate", {"url": URL}, session=session)

    def evaluate(expr):
        r = send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        if "exceptionDetails" in r:
            return {"exception": r["exceptionDetails"].get("text")}
        return r.get("result", {}).get("value")

    deadline = time.time() + 20
    while evaluate("document.readyState") != "complete" and time.time() < deadline:
        time.sleep(0.1)
    print("READY", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        if cmd == "wait":
            seconds, _, expr = rest.partition(" ")
            deadline = time.time() + float(seconds)
            # JavaScript's truthiness, not Python's; an element comes back as `true`.
            probe = f"(() => {{ const v = ({expr}); return {{ t: !!v, v: v instanceof Node ? true : v }}; }})()"
            got = evaluate(probe) or {}
            while not got.get("t") and time.time() < deadline:
                time.sleep(0.1)
                got = evaluate(probe) or {}
            print(("ok " if got.get("t") else "timeout ") + json.dumps(got.get("v", got)), flush=True)
        elif cmd == "eval":
            print("= " + json.dumps(evaluate(rest)), flush=True)
        elif cmd == "shot":
            # The whole page, not only the window.
            metrics = send("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = send("Page.captureScreenshot", {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": max(HEIGHT, size["height"]), "scale": 1},
            }, session=session)
            with open(rest, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print("shot " + rest, flush=True)
        else:
            print("unknown command " + cmd, flush=True)


try:
    main()
finally:
    proc.kill()
    proc.wait()
    shutil.rmtree(profile, ignore_errors=True)
