// Which node serves a paper through nginx: opens one session over wss://,
// prints the snapshot's `you` (with --cluster it ends with the node id), closes.
// Usage: node wss_node_of.mjs wss://127.0.0.1:PORT CERT_FILE PAPER

import { readFileSync } from "node:fs";

import { nextOf, open } from "./session.mjs";

async function main(base, certFile, paper) {
  const session = open(`${base}/ws/${paper}?user=probe`, { ca: readFileSync(certFile) });
  await session.opened;
  console.log((await nextOf(session, "snapshot")).you);
  session.ws.close(1000);
}

main(process.argv[2], process.argv[3], process.argv[4]).catch((err) => {
  console.error(`wss_node_of: ${err.message}`);
  process.exit(1);
});
