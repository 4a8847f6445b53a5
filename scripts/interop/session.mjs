// What the Node clients share: a connection whose messages are awaited one at a
// time, each wait bounded.

import WebSocket from "ws";

const TIMEOUT_MS = 20000;

/** Opens `url` (`options` go to `ws`, e.g. `{ ca }` for wss://). */
export function open(url, options = {}) {
  const ws = new WebSocket(url, options);
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

/** The next message of a type, skipping others; fails on a close. */
export async function nextOf(conn, type) {
  for (let i = 0; i < 100; i++) {
    const item = await conn.next();
    if (!item.msg) throw new Error(`closed while waiting for ${type}: ${JSON.stringify(item)}`);
    if (item.msg.type === type) return item.msg;
  }
  throw new Error(`no ${type} message`);
}

export function check(condition, what) {
  if (!condition) throw new Error(what);
}
