// A rollingpaper session driven by Node's `ws` library.
// Usage: node client.mjs ws://127.0.0.1:PORT
// Exits non-zero with a message on the first thing that differs from PROTOCOL.md.

import { check, nextOf, open } from "./session.mjs";

async function main(base) {
  const paper = `${base}/ws/interop-node`;
  const a = open(`${paper}?user=ann&name=Ann`);
  await a.opened;
  const snapA = await nextOf(a, "snapshot");
  check(snapA.paper === "interop-node" && snapA.completed === false, `snapshot ${JSON.stringify(snapA)}`);
  const b = open(`${paper}?user=bob`);
  await b.opened;
  const snapB = await nextOf(b, "snapshot");
  const join = await nextOf(a, "join");
  check(join.member.id === snapB.you && join.member.user === "bob", `join ${JSON.stringify(join)}`);

  a.ws.send(JSON.stringify({ type: "upsert", id: "n1", data: { text: "hi" }, ref: "r1" }));
  for (const conn of [a, b]) {
    const up = await nextOf(conn, "upsert");
    check(up.id === "n1" && up.author === "ann" && up.from === snapA.you && up.ref === "r1", `upsert ${JSON.stringify(up)}`);
    check(up.data.text === "hi" && up.v > 0, `upsert ${JSON.stringify(up)}`);
  }

  b.ws.send(JSON.stringify({ type: "cursor", data: { x: 3 } }));
  const cursor = await nextOf(a, "cursor");
  check(cursor.from === snapB.you && cursor.data.x === 3, `cursor ${JSON.stringify(cursor)}`);

  a.ws.send("not json");
  const error = await nextOf(a, "error");
  check(error.code === "invalid_json", `refusal ${JSON.stringify(error)}`);

  b.ws.close(1000, "bye");
  for (;;) {
    const item = await b.next();
    if (item.closed !== undefined) {
      check(item.closed === 1000, `normal close answered with ${item.closed}`);
      break;
    }
  }
  const leave = await nextOf(a, "leave");
  check(leave.member === snapB.you, `leave ${JSON.stringify(leave)}`);

  a.ws.send(JSON.stringify({ type: "upsert", id: "n2", data: { t: "x".repeat(70000) } }));
  for (;;) {
    const item = await a.next();
    if (item.closed !== undefined) {
      check(item.closed === 1009, `oversized message closed with ${item.closed}`);
      break;
    }
  }
  console.log("interop node ws: ok");
}

main(process.argv[2]).catch((err) => {
  console.error(`interop node ws: ${err.message}`);
  process.exit(1);
});
