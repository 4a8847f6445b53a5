// Two members on one paper through nginx over wss://, plus a second paper.
// Usage: node wss_client.mjs wss://127.0.0.1:PORT CERT_FILE

import { readFileSync } from "node:fs";

import { check, nextOf, open } from "./session.mjs";

async function main(base, certFile) {
  const ca = readFileSync(certFile);
  for (const paper of ["wss-card", "wss-other-card"]) {
    const a = open(`${base}/ws/${paper}?user=ann`, { ca });
    await a.opened;
    const youA = (await nextOf(a, "snapshot")).you;
    const b = open(`${base}/ws/${paper}?user=bob`, { ca });
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
