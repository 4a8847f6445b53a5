// Two members on one paper through nginx over wss://, plus a second paper.
// Usage: node wss_client.mjs wss://127.0.0.1:PORT CERT_FILE

import { readFileSync } from "node:fs";
import WebSocket from "ws";

const TIMEOUT_MS = 20000;

/** A connection whose messages are awaited one at a time. */
function open(url, ca) {
  const ws = new WebSocket(url, { ca });
  const queue = [];
  const waiters = [];
  const deliver = (item) => (waiters.length ? waiters.shift()(item) : queue.push(item));
  ws.on("message", (data) => deliver({ msg: JSON.parse(data.toString()) }));
  ws.on("close", (code) => deliver({ closed: code }));
  ws.on("error", (error) => deliver({ error }));
  const next = () =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("timed out waiting for a message")), TIMEOUT_MS);
      const take = (item) => {
        clearTimeout(timer);
        resolve(item);
      };
      queue.length ? take(queue.shift()) : waiters.push(take);
    });
  const opened = new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  return { ws, next, opened };
}

async function nextOf(conn, type) {
  for (let i = 0; i < 100; i++) {
    const item = await conn.next();
    if (!item.msg) throw new Error(`closed while waiting for ${type}: ${JSON.stringify(item)}`);
    if (item.msg.type === type) return item.msg;
  }
  throw new Error(`no ${type} message`);
}

function check(condition, what) {
  if (!condition) throw new Error(what);
}

async function main(base, certFile) {
  const ca = readFileSync(certFile);
  for (const paper of ["wss-card", "wss-other-card"]) {
    const a = open(`${base}/ws/${paper}?user=ann`, ca);
    await a.opened;
    const youA = (await nextOf(a, "snapshot")).you;
    const b = open(`${base}/ws/${paper}?user=bob`, ca);
    await b.opened;
    await nextOf(b, "snapshot");
    a.ws.send(JSON.stringify({ type: "upsert", id: "n1", data: { text: "hello over TLS" } }));
    const seen = await nextOf(b, "upsert");
    check(seen.from === youA && seen.data.text === "hello over TLS", `b saw ${JSON.stringify(seen)}`);
    b.ws.send(JSON.stringify({ type: "upsert", id: "n2", data: { text: "and back" } }));
    check((await nextOf(a, "upsert")).id === "n1", "a's own edit confirmed first");
    const back = await nextOf(a, "upsert");
    check(back.id === "n2" && back.data.text === "and back", `a saw ${JSON.stringify(back)}`);
    a.ws.close(1000);
    b.ws.close(1000);
  }
  console.log("wss through nginx: ok");
}

main(process.argv[2], process.argv[3]).catch((err) => {
  console.error(`wss through nginx: ${err.message}`);
  process.exit(1);
});
