"""An acceptance run of ringcast by clients it did not write.

Python `requests` publishes (it writes the head and the body of a POST
separately), `websockets` subscribes in both formats and sends arrays of
requests whose channels have owners on other cores. Exits non-zero, with
the reason, at the first behaviour that differs from docs/protocol.md.

    python acceptance.py http://127.0.0.1:8080
    python acceptance.py https://127.0.0.1:8443 ca.pem   # over TLS
"""

import asyncio
import json
import ssl
import sys

import msgpack
import requests
import websockets

BASE = sys.argv[1].rstrip("/")
WS = BASE.replace("https://", "wss://").replace("http://", "ws://") + "/ws"
# Over TLS, the certificate authority to trust (the test's own).
CA = sys.argv[2] if len(sys.argv) > 2 else None
SSL = ssl.create_default_context(cafile=CA) if CA else None
VERIFY = CA if CA else True


def check(condition, what):
    if not condition:
        raise SystemExit(f"acceptance: {what}")


def events(frame, binary):
    value = msgpack.unpackb(frame, raw=False) if binary else json.loads(frame)
    return value if isinstance(value, list) else [value]


async def next_events(ws, binary, n):
    got = []
    while len(got) < n:
        frame = await asyncio.wait_for(ws.recv(), 20)
        got.extend(events(frame, binary))
    return got


async def replies_in_order(subprotocol):
    binary = subprotocol.endswith("msgpack")
    async with websockets.connect(WS, subprotocols=[subprotocol], ssl=SSL) as ws:
        check(ws.subprotocol == subprotocol, f"subprotocol {ws.subprotocol}")
        for round in range(20):
            a, b = f"py.{subprotocol}.a{round}", f"py.{subprotocol}.b{round}"
            batch = [
                {"action": "subscribe", "channel": a, "id": 1},
                {"action": "publish", "channel": a, "data": {"n": round}, "id": 2},
                {"action": "subscribe", "channel": b, "id": 3},
                {"action": "unsubscribe", "channel": b, "id": 4},
                {"action": "dance", "channel": b, "id": 5},
                {"action": "unsubscribe", "channel": a, "id": 6},
            ]
            await ws.send(msgpack.packb(batch) if binary else json.dumps(batch))
            replies = []
            while len(replies) < len(batch):
                for ev in await next_events(ws, binary, 1):
                    if ev["type"] != "message":
                        replies.append((ev.get("id"), ev["type"]))
            want = [
                (1, "subscribed"),
                (2, "published"),
                (3, "subscribed"),
                (4, "unsubscribed"),
                (5, "error"),
                (6, "unsubscribed"),
            ]
            check(replies == want, f"{subprotocol} round {round}: replies {replies}")


async def http_publish_reaches_both_formats():
    async with websockets.connect(WS, subprotocols=["ringcast.v1.json"], ssl=SSL) as j, \
            websockets.connect(WS, subprotocols=["ringcast.v1.msgpack"], ssl=SSL) as m:
        for ws, binary in ((j, False), (m, True)):
            await ws.send(
                msgpack.packb({"action": "subscribe", "channel": "py.http", "id": 1})
                if binary
                else json.dumps({"action": "subscribe", "channel": "py.http", "id": 1})
            )
            (ack,) = await next_events(ws, binary, 1)
            check(ack["type"] == "subscribed", f"subscribe answered {ack}")
        # One-byte and two-byte bodies: requests sends them apart from the head.
        for body in ["1", "0", "12", '{"bid":189.2}']:
            r = requests.post(
                f"{BASE}/publish/py.http",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=20,
                verify=VERIFY,
            )
            check(r.status_code == 202, f"POST {body!r}: {r.status_code} {r.text}")
            for ws, binary in ((j, False), (m, True)):
                (ev,) = await next_events(ws, binary, 1)
                check(ev["data"] == json.loads(body), f"{body!r} arrived as {ev}")
        r = requests.post(
            f"{BASE}/publish/py.http",
            data=b"\xc1",
            headers={"Content-Type": "application/msgpack"},
            timeout=20,
            verify=VERIFY,
        )
        check(r.status_code == 400, f"0xc1 answered {r.status_code}")
        check(r.json()["error"]["code"] == "bad_request", r.text)
        r = requests.post(
            f"{BASE}/publish/py.http", data={"form": "1"}, timeout=20, verify=VERIFY
        )
        check(r.status_code == 415, f"a form answered {r.status_code}")
        check("application/json" in r.json()["error"]["message"], r.text)


def head_has_no_body():
    with requests.Session() as s:
        r = s.head(f"{BASE}/", timeout=20, verify=VERIFY)
        check(r.status_code == 200 and r.content == b"", f"HEAD / gave {len(r.content)} bytes")
        check(int(r.headers["Content-Length"]) > 0, "HEAD keeps the length")
        r = s.get(f"{BASE}/healthz", timeout=20, verify=VERIFY)
        check(r.text == "ok\n", f"the request after HEAD got {r.text!r}")


async def main():
    head_has_no_body()
    await replies_in_order("ringcast.v1.json")
    await replies_in_order("ringcast.v1.msgpack")
    await http_publish_reaches_both_formats()
    print("acceptance: ok")


asyncio.run(main())
