// examples/node.mjs in TypeScript: the same script, checked under `strict`
// (scripts/client-test.sh runs `tsc --noEmit --strict` over it).
//
//   cd examples && npm install && npm run typecheck   # tsc -p . --noEmit --strict
//
// The types come with the client (src/web/rollingpaper-client.d.ts, served
// at /client.d.ts); the `ws` package's WebSocket is passed without a cast.
import WebSocket from 'ws';
import { RollingPaper, type Edit, type NoteEditRef, type Refusal } from '../src/web/rollingpaper-client.js';

const url: string = process.argv[2] || process.env.RP_URL || 'ws://127.0.0.1:8080';
const paper: string = process.argv[3] || process.env.RP_PAPER || 'example-card';
const TIMEOUT_MS = 10_000;

const rp = new RollingPaper({ url, paper, user: 'node-example', name: 'Node example', WebSocket });

const timer = setTimeout(() => finish(1, `not saved within ${TIMEOUT_MS / 1000} s (status: ${rp.state.status})`), TIMEOUT_MS);

let done = false;
function finish(code: number, problem?: string): void {
  if (done) return;
  done = true;
  clearTimeout(timer);
  rp.close();
  if (problem) console.error(`node example: ${problem}`);
  process.exitCode = code;
}

rp.on('status', ({ status, reason }) => {
  // These statuses are final: the client does not try again by itself.
  if (status === 'unauthorised' || status === 'forbidden' || status === 'revoked' || status === 'erased') {
    finish(1, `${status}${reason ? `: ${reason}` : ''}`);
  }
});
rp.on('snapshot', ({ first }) => {
  if (first) console.log(`connected to ${url} as ${rp.state.you}, paper ${paper}`);
});

// Queued now, sent once the session is open (the edit is shown in rp.state at once).
const { id, ref }: NoteEditRef = rp.create({ kind: 'text', text: `Hello from Node, ${new Date().toISOString()}`, author_name: 'Node example' });

// Every outcome of the edit carries its ref.
rp.on('saved', (edit: Edit) => {
  if (edit.ref !== ref) return;
  console.log(`saved note ${id} (v ${edit.v})`);
  printPaper();
  finish(0);
});
rp.on('refused', ({ ref: refused, code, message, retrying }: Refusal) => {
  if (refused === ref && !retrying) finish(1, `note refused: ${code} (${message})`);
});
rp.on('write_failed', (edit) => {
  if (edit.ref === ref) finish(1, 'the server could not store the note');
});
rp.on('unconfirmed', (edit) => {
  if (edit.ref === ref) finish(1, 'the session closed before the note was saved');
});

rp.connect();

function printPaper(): void {
  const { cover, notes, completed } = rp.state;
  const list = Object.values(notes);
  const title = cover.data.title ? ` "${cover.data.title}"` : '';
  console.log(`paper ${paper}${title}: ${list.length} note(s)${completed ? ', sealed' : ''}`);
  for (const note of list) {
    const text = typeof note.data.text === 'string' ? note.data.text : JSON.stringify(note.data);
    console.log(`  ${note.id}  ${note.data.author_name || note.author}: ${text}`);
  }
}
