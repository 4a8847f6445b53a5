"""Two members on one paper through nginx over wss://, plus a second paper.

Usage: wss_client.py wss://127.0.0.1:PORT CERT_FILE
"""

import json
import ssl
import sys

from websockets.sync.client import connect

TIMEOUT = 20


def recv_type(ws, kind):
    for _ in range(100):
        msg = json.loads(ws.recv(timeout=TIMEOUT))
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind} message")


def main(base, cert):
    tls = ssl.create_default_context(cafile=cert)
    for paper in ("wss-card", "wss-other-card"):
        with connect(f"{base}/ws/{paper}?user=ann", ssl=tls, open_timeout=TIMEOUT) as a, connect(
            f"{base}/ws/{paper}?user=bob", ssl=tls, open_timeout=TIMEOUT
        ) as b:
            you_a = recv_type(a, "snapshot")["you"]
            recv_type(b, "snapshot")
            a.send(json.dumps({"type": "upsert", "id": "n1", "data": {"text": "hello over TLS"}}))
            seen = recv_type(b, "upsert")
            assert seen["from"] == you_a and seen["data"]["text"] == "hello over TLS", seen
            b.send(json.dumps({"type": "upsert", "id": "n2", "data": {"text": "and back"}}))
            assert recv_type(a, "upsert")["id"] == "n1"  # its own, confirmed
            back = recv_type(a, "upsert")
            assert back["id"] == "n2" and back["data"]["text"] == "and back", back
    print("wss through nginx: ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
