// The rollingpaper client under Node: connects to a paper, writes a note,
// waits until the server has stored it (`saved`), prints the paper, exits 0
// (1 when the note is refused or not saved within 10 s).
//
//   cd examples && npm install          # the `ws` package (once); Node 20.19 or later
//   node node.mjs [SERVER_URL] [PAPER]  # default ws://127.0.0.1:8080 example-card
//
// SERVER_URL (http(s):// or ws(s)://) may also come from RP_URL, and PAPER
// from RP_PAPER. Start a server first: scripts/run.sh (or
// `scripts/run.sh --store memory` without Redis).
//
// Under Node, the client needs two things a page has by itself: the server's
// `url`, and a WebSocket implementation (`ws`). It is imported here from the
// repository; elsewhere, use a copy of the one a server serves:
//   curl -o rollingpaper-client.js http://127.0.0.1:8080/client.js
//   curl -o rollingpaper-client.d.ts http://127.0.0.1:8080/client.d.ts  # types, for TypeScript
import WebSocket from 'ws';
import { RollingPaper } from '../src/web/rollingpaper-client.js';

const url = process.argv[2] || process.env.RP_URL || 'ws://127.0.0.1:8080';
const paper = process.argv[3] || process.env.RP_PAPER || 'example-card';
const TIMEOUT_MS = 10_000;

const rp = new RollingPaper({ url, paper, user: 'node-example', name: 'Node example', WebSocket });

const timer = setTimeout(() => finish(1, `not saved within ${TIMEOUT_MS / 1000} s (status: ${rp.state.status})`), TIMEOUT_MS);

let done = false;
function finish(code, problem) {
  if (done) return;
  done = true;
  clearTimeout(timer);
  rp.close();
  if (problem) console.error(`node example: ${problem}`);
  process.exitCode = code;
}

rp.on('status', ({ status, reason }) => {
  // These statuses are final: the client does not try again by itself.
  if (['unauthorised', 'forbidden', 'revoked', 'erased'].includes(status)) finish(1, `${status}${reason ? `: ${reason}` : ''}`);
});
rp.on('snapshot', ({ first }) => {
  if (first) console.log(`connected to ${url} as ${rp.state.you}, paper ${paper}`);
});

// Queued now, sent once the session is open (the edit is shown in rp.state at once).
const { id, ref } = rp.create({ kind: 'text', text: `Hello from Node, ${new Date().toISOString()}`, author_name: 'Node example' });

// Every outcome of the edit carries its ref.
rp.on('saved', (edit) => {
  if (edit.ref !== ref) return;
  console.log(`saved note ${id} (v ${edit.v})`);
  printPaper();
  finish(0);
});
rp.on('refused', ({ ref: refused, code, message, retrying }) => {
  if (refused === ref && !retrying) finish(1, `note refused: ${code} (${message})`);
});
rp.on('write_failed', (edit) => {
  if (edit.ref === ref) finish(1, 'the server could not store the note');
});
rp.on('unconfirmed', (edit) => {
  if (edit.ref === ref) finish(1, 'the session closed before the note was saved');
});

rp.connect();

function printPaper() {
  const { cover, notes, completed } = rp.state;
  const list = Object.values(notes);
  const title = cover.data.title ? ` "${cover.data.title}"` : '';
  console.log(`paper ${paper}${title}: ${list.length} note(s)${completed ? ', sealed' : ''}`);
  for (const note of list) {
    const text = typeof note.data.text === 'string' ? note.data.text : JSON.stringify(note.data);
    console.log(`  ${note.id}  ${note.data.author_name || note.author}: ${text}`);
  }
}
