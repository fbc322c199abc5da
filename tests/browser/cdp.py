"""Drives a headless Chromium over the DevTools protocol for tests/browser.rs.

Starts the browser (its path in argv[1]) with a profile of its own,
trusting exactly one TLS key (its SubjectPublicKeyInfo, DER, in the file
argv[2]) and no other certificate it could not verify, then runs the
steps of the JSON plan on stdin, page by page: open a URL, wait until an
expression is true, evaluate an expression, send SIGTERM to a process the
test started, take a screenshot. Prints one
JSON object: for each page, what its last `read` expression returned.
Any step that does not come true within its deadline fails the run with
a message saying which, and the browser is always stopped.
"""

import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import websockets

DEADLINE = 20.0


class Browser:
    def __init__(self, path, spki):
        self.profile = tempfile.mkdtemp(prefix="ringcast-chromium-")
        self.proc = subprocess.Popen(
            [
                path,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={self.profile}",
                f"--ignore-certificate-errors-spki-list={spki}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.next_id = 0
        self.pending = {}

    async def connect(self):
        active = os.path.join(self.profile, "DevToolsActivePort")
        end = time.monotonic() + DEADLINE
        while not (os.path.exists(active) and len(open(active).read().split()) >= 2):
            if self.proc.poll() is not None:
                raise SystemExit(f"chromium exited at start with status {self.proc.returncode}")
            if time.monotonic() > end:
                raise SystemExit("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port, path = open(active).read().split()[:2]
        self.ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self.reader = asyncio.create_task(self.read())

    async def read(self):
        async for raw in self.ws:
            msg = json.loads(raw)
            waiter = self.pending.pop(msg.get("id"), None)
            if waiter is not None:
                waiter.set_result(msg)

    async def call(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        waiter = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = waiter
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(waiter, DEADLINE)
        if "error" in reply:
            raise SystemExit(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, session, expression):
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session,
        )
        if "exceptionDetails" in result:
            raise SystemExit(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


async def run(browser, plan):
    await browser.connect()
    out = {}
    for page in plan:
        target = await browser.call("Target.createTarget", {"url": page["url"]})
        attached = await browser.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        session = attached["sessionId"]
        for step in page["steps"]:
            if "wait" in step:
                end = time.monotonic() + DEADLINE
                # False, not an error, while the page is still loading.
                test = f"(() => {{ try {{ return !!({step['wait']}); }} catch (e) {{ return false; }} }})()"
                while not await browser.evaluate(session, test):
                    if time.monotonic() > end:
                        seen = await browser.evaluate(session, "document.documentElement.outerHTML")
                        raise SystemExit(f"{page['name']}: never true: {step['wait']}; the page shows: {seen}")
                    await asyncio.sleep(0.05)
            if "eval" in step:
                await browser.evaluate(session, step["eval"])
            if "terminate" in step:
                # A process the test started (a relay to drain).
                os.kill(step["terminate"], signal.SIGTERM)
            if "screenshot" in step:
                shot = await browser.call("Page.captureScreenshot", {"format": "png"}, session)
                with open(step["screenshot"], "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
        out[page["name"]] = await browser.evaluate(session, page.get("read", "document.body.innerText"))
    return out


def main():
    plan = json.load(sys.stdin)
    spki = open(sys.argv[2], "rb").read()
    browser = Browser(sys.argv[1], base64.b64encode(hashlib.sha256(spki).digest()).decode())
    try:
        print(json.dumps(asyncio.run(run(browser, plan))))
    finally:
        browser.stop()


if __name__ == "__main__":
    main()
