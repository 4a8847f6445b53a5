"""A rollingpaper session driven by Python's `websockets` library.

Usage: client.py ws://127.0.0.1:PORT
Exits non-zero with a message on the first thing that differs from PROTOCOL.md.
"""

import json
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

TIMEOUT = 20


def recv(ws):
    return json.loads(ws.recv(timeout=TIMEOUT))


def recv_type(ws, kind):
    """The next message of a type, skipping presence and `saved`."""
    for _ in range(100):
        msg = recv(ws)
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind} message")


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def main(base):
    paper = f"{base}/ws/interop-python"
    with connect(f"{paper}?user=ann&name=Ann", open_timeout=TIMEOUT) as a, connect(
        f"{paper}?user=bob", open_timeout=TIMEOUT
    ) as b:
        snap_a = recv(a)
        check(snap_a["type"] == "snapshot" and snap_a["paper"] == "interop-python", f"snapshot: {snap_a}")
        you_a = snap_a["you"]
        snap_b = recv(b)
        check(snap_b["type"] == "snapshot", f"snapshot: {snap_b}")
        you_b = snap_b["you"]
        join = recv_type(a, "join")
        check(join["member"] == {"id": you_b, "user": "bob", "name": "bob"}, f"join: {join}")

        a.send(json.dumps({"type": "upsert", "id": "n1", "data": {"text": "hi"}, "ref": "r1"}))
        for ws in (a, b):
            up = recv_type(ws, "upsert")
            check(up["id"] == "n1" and up["author"] == "ann" and up["from"] == you_a, f"upsert: {up}")
            check(up["ref"] == "r1" and up["data"] == {"text": "hi"} and up["v"] > 0, f"upsert: {up}")

        b.send(json.dumps({"type": "cursor", "data": {"x": 3}}))
        cursor = recv_type(a, "cursor")
        check(cursor == {"type": "cursor", "from": you_b, "data": {"x": 3}}, f"cursor: {cursor}")
        b.send(json.dumps({"type": "ping"}))
        check(recv_type(b, "pong") == {"type": "pong"}, "pong")

        a.send("not json")
        error = recv_type(a, "error")
        check(error["code"] == "invalid_json", f"refusal: {error}")

        b.close(code=1000)
        check(b.close_code == 1000, f"normal close answered with {b.close_code}")
        check(recv_type(a, "leave")["member"] == you_b, "leave")

        a.send(json.dumps({"type": "upsert", "id": "n2", "data": {"t": "x" * 70000}}))
        try:
            for _ in range(100):
                a.recv(timeout=TIMEOUT)
            raise AssertionError("an oversized message did not close the session")
        except ConnectionClosed as closed:
            check(closed.rcvd is not None and closed.rcvd.code == 1009, f"oversized: {closed}")
    print("interop python websockets: ok")


if __name__ == "__main__":
    main(sys.argv[1])
