// Tests of the page's protocol client (src/web/rollingpaper-client.js) under
// Node, with the `ws` package as its WebSocket: against the real server (one
// with Redis, restarted in the middle, and one with auth on), and against a
// scripted server for the messages a healthy server rarely sends (a snapshot
// in mid-session, write_failed, a snapshot with `since`). Last, 1.2's ends of
// a session for good: 4403 and 4410 from a scripted server, then from a real
// one through its backend API (PROTOCOL.md 7), started with an API key.
// Also: what the edit methods return (`{ref}`, and `id` for a note) and
// refuse (data that is not a plain object), and examples/node.mjs run as a
// person would, against the real server.
//
// Every wait is a condition with a deadline; nothing sleeps to synchronise.
//
// Environment (scripts/client-test.sh sets it): RP_BIN (server binary),
// RP_REDIS (redis URL), RP_WORK (a scratch directory).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { openSync, writeFileSync } from 'node:fs';
import { get as httpGet } from 'node:http';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket, { WebSocketServer } from 'ws';
import { RollingPaper } from '../../src/web/rollingpaper-client.js';

const STEP_TIMEOUT_MS = 10_000;
const GLOBAL_TIMEOUT_MS = 110_000;
const SECRET = 'client-test-secret-0123456789';
// PROTOCOL.md 7: at least 32 bytes.
const API_KEY = 'client-test-api-key-0123456789abcdef';
// A reconnection that must not happen can only be watched for: this long is
// several backoff periods of the test clients (100 ms to 800 ms).
const NO_RECONNECT_WINDOW_MS = 1500;

const config = { bin: need('RP_BIN'), redis: need('RP_REDIS'), work: need('RP_WORK') };

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set; run scripts/client-test.sh`);
  return value;
}

// ---- Helpers ----------------------------------------------------------------------

async function until(what, predicate, timeout = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10)); // poll interval of a condition with a deadline
  }
}

function check(condition, what) {
  if (!condition) throw new Error(what);
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

/** A WebSocket class that records the addresses it opens and the messages it sends. */
function recordingWebSocket(urls, frames = []) {
  return class extends WebSocket {
    constructor(url) {
      urls.push(url);
      super(url);
    }

    send(data, ...rest) {
      frames.push(JSON.parse(String(data)));
      return super.send(data, ...rest);
    }
  };
}

const clients = new Set();

/** A client with short backoffs, recording its events in `.events`. */
function client(url, paper, options = {}) {
  const urls = [];
  const frames = [];
  const rp = new RollingPaper({
    url, paper, WebSocket: recordingWebSocket(urls, frames), backoffMinMs: 100, backoffMaxMs: 800, retryRefusedMs: 200, ...options,
  });
  rp.urls = urls;
  rp.frames = frames;
  rp.events = [];
  for (const type of ['status', 'refused', 'saved', 'applied', 'write_failed', 'unconfirmed', 'denied', 'completed', 'snapshot', 'join', 'leave', 'close', 'ended', 'pong']) {
    rp.on(type, (detail) => rp.events.push({ type, detail }));
  }
  rp.eventsOf = (type) => rp.events.filter((e) => e.type === type).map((e) => e.detail);
  clients.add(rp);
  rp.connect();
  return rp;
}

async function online(rp) {
  await until(`${rp.options.name || rp.options.user || 'client'} online`, () => rp.state.status === 'online' && rp.isOpen);
}

function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ exp: Math.floor(Date.now() / 1000) + 600, ...claims })}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

// ---- The server under test ------------------------------------------------------------

class Server {
  constructor(name, args) {
    this.name = name;
    this.args = args;
    this.child = null;
    this.log = openSync(join(config.work, `${name}.log`), 'a');
  }

  async start() {
    this.port ??= await freePort();
    this.url = `http://127.0.0.1:${this.port}`;
    const child = spawn(config.bin, ['--listen', `127.0.0.1:${this.port}`, ...this.args], { stdio: ['ignore', this.log, this.log] });
    this.child = child;
    writeFileSync(join(config.work, `${this.name}.pid`), String(child.pid));
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + STEP_TIMEOUT_MS;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`${this.name} exited at start; see ${this.name}.log`);
      try {
        if ((await fetch(`${this.url}/healthz`)).ok) return;
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) throw new Error(`${this.name} did not answer /healthz`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill('SIGTERM');
    await this.exited;
    this.child = null;
  }

  kill() {
    if (this.child && this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

/** Which of 1.1's `meta` and `patch` the server speaks: a refusal says no. */
async function speaks11(url) {
  const rp = client(url, `probe-${Date.now().toString(36)}`, { user: 'probe' });
  await online(rp);
  const { ref: cover } = rp.setCover({ title: 'probe' });
  const { id } = rp.create({ text: 'probe' });
  rp.flush();
  const { ref: patch } = rp.patch(id, { text: 'probed' });
  const settled = (ref) => rp.eventsOf('applied').some((e) => e.ref === ref) || rp.eventsOf('refused').some((e) => e.ref === ref && !e.retrying);
  await until('the probes to settle', () => settled(cover) && settled(patch));
  rp.close();
  return { meta: rp.eventsOf('applied').some((e) => e.ref === cover), patch: !rp.patchless };
}

/** Starts `server` unless it runs. */
async function running(server) {
  if (!server.child || server.child.exitCode !== null) await server.start();
  return server;
}

/** A request to the backend API (PROTOCOL.md 7) with the API key: `{status, text}`. */
async function api(server, method, path, body) {
  const headers = { Authorization: `Bearer ${API_KEY}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(`${server.url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, text: await res.text() };
}

/** The server's count of TCP connections accepted, read over a connection of its own (which it counts). */
function connectionsAccepted(server) {
  return new Promise((resolve, reject) => {
    httpGet(`${server.url}/metrics`, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => {
        const found = /^rollingpaper_connections_accepted_total (\d+)$/m.exec(body);
        if (found) resolve(Number(found[1]));
        else reject(new Error(`no rollingpaper_connections_accepted_total in /metrics (${res.statusCode})`));
      });
    }).on('error', reject);
  });
}

/**
 * Checks that clients ended by the server stay ended: over a window of
 * several backoff periods, even when told the network is back, none opens a
 * WebSocket, and the server accepts no connection but the one that reads
 * its count.
 */
async function staysEnded(server, rps, status) {
  const opened = rps.map((rp) => rp.urls.length);
  const before = await connectionsAccepted(server);
  for (const rp of rps) rp.reconnectNow();
  await new Promise((r) => setTimeout(r, NO_RECONNECT_WINDOW_MS)); // the window watched, not a synchronisation
  const after = await connectionsAccepted(server);
  check(after - before === 1, `the server accepted ${after - before - 1} connection(s) after the sessions ended`);
  for (const [i, rp] of rps.entries()) {
    const who = rp.options.name || rp.options.user;
    check(rp.urls.length === opened[i], `${who} reconnected: ${rp.urls.slice(opened[i]).join(' ')}`);
    check(rp.state.status === status && !rp.isOpen, `${who} is ${rp.state.status}, not ${status}`);
  }
}

/** Checks the `ended` event of a client ended with `code`: once, after `close`, and its status. */
function checkEnded(rp, code, status) {
  const who = rp.options.name || rp.options.user;
  const ended = rp.eventsOf('ended');
  check(ended.length === 1 && ended[0].code === code && ended[0].status === status, `${who}: ended ${JSON.stringify(ended)}`);
  const closeAt = rp.events.findIndex((e) => e.type === 'close' && e.detail.code === code);
  const endedAt = rp.events.findIndex((e) => e.type === 'ended');
  check(closeAt !== -1 && closeAt < endedAt, `${who}: no close ${code} before ended`);
  check(!rp.events.slice(endedAt).some((e) => e.type === 'unconfirmed'), `${who}: an edit reported after ended`);
  check(rp.state.status === status && rp.state.pending === 0, `${who}: status ${rp.state.status}, ${rp.state.pending} pending`);
}

// ---- Scenarios against the real server ----------------------------------------------------

const paperId = (name) => `client-${name}-${Date.now().toString(36)}`;

async function optimisticEditsAreSavedOneByOne({ redisServer }) {
  const paper = paperId('saved');
  const ann = client(redisServer.url, paper, { user: 'ann', name: 'Ann' });
  await online(ann);
  const ben = client(redisServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ben);
  await until('Ann to see Ben join', () => Object.values(ann.state.members).some((m) => m.name === 'Ben'));
  check(Object.values(ben.state.members).some((m) => m.name === 'Ann'), 'Ben\'s snapshot lacks Ann');

  // Shown at once, before any answer; then confirmed with a version, then saved.
  const { id, ref } = ann.create({ kind: 'text', text: 'Happy birthday, Kim!', author_name: 'Ann' });
  check(ann.state.notes[id]?.pending === true && ann.state.notes[id].v === 0, 'a new note is not shown at once as pending');
  const second = ann.create({ kind: 'text', text: 'Second', author_name: 'Ann' });
  await until('Ben to see the note', () => ben.state.notes[id]?.data.text === 'Happy birthday, Kim!');
  await until('both edits saved', () => [ref, second.ref].every((r) => ann.eventsOf('saved').some((e) => e.ref === r)));
  check(ann.state.notes[id].v > 0 && !ann.state.notes[id].pending, 'the saved note is still pending');
  check(ann.state.pending === 0, `edits still pending: ${ann.state.pending}`);
  check(ann.state.lastV >= ann.state.notes[id].v, 'lastV is below a seen version');

  // Ann leaves; her signature stays with her note.
  ann.close();
  await until('Ben to see Ann leave', () => !Object.values(ben.state.members).some((m) => m.name === 'Ann'));
  check(ben.state.notes[id].data.author_name === 'Ann', 'the signature went with its author');
  ben.close();
}

async function refusalsAreTypedAndRolledBack({ redisServer }) {
  const paper = paperId('refusals');
  const rp = client(redisServer.url, paper, { user: 'ann' });
  await online(rp);
  const { ref: missing } = rp.remove('no-such-note');
  await until('not_found', () => rp.eventsOf('refused').some((e) => e.ref === missing));
  const refusal = rp.eventsOf('refused').find((e) => e.ref === missing);
  check(refusal.code === 'not_found' && refusal.edit?.kind === 'delete', `not the refusal expected: ${JSON.stringify(refusal)}`);

  const big = rp.create({ kind: 'text', text: 'x'.repeat(20 * 1024) });
  check(rp.state.notes[big.id], 'the big note is not shown at once');
  await until('too_large', () => rp.eventsOf('refused').some((e) => e.ref === big.ref && e.code === 'too_large'));
  check(!rp.state.notes[big.id], 'a refused create is still shown');

  rp.sendRaw({ type: 'shout' });
  await until('invalid_message', () => rp.eventsOf('refused').some((e) => e.code === 'invalid_message' && e.ref === null));
  check(rp.state.pending === 0, 'refused edits are still pending');
  rp.close();
}

async function dragAndTypeAtOnceKeepBoth({ redisServer }) {
  const paper = paperId('patch');
  const ann = client(redisServer.url, paper, { user: 'ann', name: 'Ann' });
  const ben = client(redisServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ann);
  await online(ben);
  const { id } = ann.create({ kind: 'text', text: 'Dear Kim,', x: 10, y: 10, author_name: 'Ann' });
  await until('Ben to see the note', () => ben.state.notes[id]?.v > 0);
  // Interleaved: Ann types while Ben drags, each patching only their fields.
  for (let i = 1; i <= 10; i++) {
    ann.patch(id, { text: 'Dear Kim,' + ' we miss you'.repeat(i) });
    ben.patch(id, { x: 10 + i * 20, y: 10 + i * 10 });
    await new Promise((r) => setTimeout(r, 15)); // pacing of the simulated typing, not a synchronisation
  }
  // A patch that names no field is a mistake of the caller, said at once.
  let refused = null;
  try {
    ann.patch(id, {});
  } catch (err) {
    refused = err;
  }
  check(refused instanceof TypeError, `an empty patch throws a TypeError, not ${refused}`);
  const want = { text: 'Dear Kim,' + ' we miss you'.repeat(10), x: 210, y: 110 };
  for (const rp of [ann, ben]) {
    await until(`${rp.options.name} to hold both changes`, () => {
      const d = rp.state.notes[id]?.data;
      return d && d.text === want.text && d.x === want.x && d.y === want.y && rp.state.pending === 0;
    });
  }
  // A third member joining now gets the same.
  const cat = client(redisServer.url, paper, { user: 'cat' });
  await online(cat);
  const d = cat.state.notes[id].data;
  check(d.text === want.text && d.x === want.x && d.y === want.y, `a joiner sees ${JSON.stringify(d)}`);
  for (const rp of [ann, ben, cat]) rp.close();
}

async function coverIsSharedAndSealingReplacesTheView({ redisServer }) {
  const paper = paperId('cover');
  const ann = client(redisServer.url, paper, { user: 'ann', name: 'Ann' });
  const ben = client(redisServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ann);
  await online(ben);
  const cover = { title: 'Happy birthday, Kim', to: 'Kim', occasion: 'Birthday' };
  ann.setCover(cover);
  check(ann.state.cover.data.title === cover.title, 'the cover is not shown at once');
  await until('Ben to see the cover', () => ben.state.cover.data.title === cover.title && ben.state.cover.v > 0);
  const { id } = ann.create({ kind: 'text', text: 'Congratulations!', author_name: 'Ann' });
  await until('Ben to see the note', () => ben.state.notes[id]?.v > 0);
  const seal = ben.complete();
  for (const rp of [ann, ben]) {
    await until(`${rp.options.name} to see the seal`, () => rp.state.completed && rp.eventsOf('completed').length === 1);
    check(rp.state.notes[id]?.data.text === 'Congratulations!', 'the sealed notes lack the note');
    check(rp.state.cover.data.title === cover.title, 'the cover was lost at the seal');
  }
  check(ben.eventsOf('completed')[0].ref === seal.ref && ann.eventsOf('completed')[0].ref === null, 'the seal does not carry Ben\'s ref');
  const { ref: late } = ann.patch(id, { text: 'too late' });
  await until('a local paper_completed refusal', () => ann.eventsOf('refused').some((e) => e.ref === late && e.code === 'paper_completed'));
  check(ann.state.notes[id].data.text === 'Congratulations!', 'an edit after the seal shows');
  // A later joiner gets a sealed paper with its cover.
  const cat = client(redisServer.url, paper, { user: 'cat' });
  await online(cat);
  check(cat.state.completed && cat.state.cover.data.to === 'Kim', 'the joiner misses the seal or the cover');
  for (const rp of [ann, ben, cat]) rp.close();
}

async function completingWithoutCover({ redisServer }) {
  const paper = paperId('seal');
  const ann = client(redisServer.url, paper, { user: 'ann', name: 'Ann' });
  const ben = client(redisServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ann);
  await online(ben);
  const { id } = ann.create({ kind: 'text', text: 'Well done!' });
  await until('Ben to see the note', () => ben.state.notes[id]?.v > 0);
  ben.complete();
  for (const rp of [ann, ben]) {
    await until(`${rp.options.name} to see the seal`, () => rp.state.completed);
    check(rp.state.notes[id]?.data.text === 'Well done!', 'the sealed notes lack the note');
  }
  for (const rp of [ann, ben]) rp.close();
}

/**
 * Every edit method returns `{ref}` (and the note's `id` where it names one),
 * refuses data that is not a plain object with a TypeError before anything
 * is queued or sent, and each outcome carries the ref: a `saved`, a refusal,
 * and for `complete()` a refusal or the `completed` event. Auth is on, so
 * that a writer's cover and seal are refused (owner only).
 */
async function editsReturnRefsAndRefuseNonObjects({ authServer }) {
  const paper = paperId('refs');
  const ann = client(authServer.url, paper, { token: jwt({ sub: 'ann', paper, role: 'owner', name: 'Ann' }) });
  const ben = client(authServer.url, paper, { token: jwt({ sub: 'ben', paper, role: 'writer', name: 'Ben' }) });
  await online(ann);
  await online(ben);
  const note = ben.create({ kind: 'text', text: 'Mine' });
  check(Object.keys(note).sort().join() === 'id,ref' && typeof note.ref === 'string', `create returned ${JSON.stringify(note)}`);
  await until('the note saved', () => ben.eventsOf('saved').some((e) => e.ref === note.ref));

  // Nonsense: a TypeError at once, nothing queued, nothing sent.
  const sentBefore = ben.frames.length;
  const nonsense = { 'a string': 'oops', null: null, 'an array': ['a'], 'a number': 42, undefined, 'a Date': new Date() };
  for (const [label, bad] of Object.entries(nonsense)) {
    const calls = {
      create: () => ben.create(bad), replace: () => ben.replace(note.id, bad), patch: () => ben.patch(note.id, bad), setCover: () => ben.setCover(bad),
    };
    for (const [method, call] of Object.entries(calls)) {
      let thrown = null;
      try {
        call();
      } catch (err) {
        thrown = err;
      }
      check(thrown instanceof TypeError, `${method} with ${label}: ${thrown ? `threw ${thrown}` : 'no TypeError'}`);
    }
  }
  ben.flush();
  check(ben.frames.length === sentBefore && ben.state.pending === 0, `nonsense was sent or queued: ${JSON.stringify(ben.frames.slice(sentBefore))}`);
  check(Object.keys(ben.state.cover.data).length === 0 && ben.state.notes[note.id].data.text === 'Mine', 'nonsense changed the view');

  // Each edit's outcome follows its ref (flushed one by one: edits of one note made together share one).
  const replaced = ben.replace(note.id, { kind: 'text', text: 'Mine, again' });
  ben.flush();
  const patched = ben.patch(note.id, { x: 5 });
  ben.flush();
  const removed = ben.remove(note.id);
  const cover = ben.setCover({ title: 'Not for a writer' });
  for (const [method, result, keys] of [['replace', replaced, 'id,ref'], ['patch', patched, 'id,ref'], ['remove', removed, 'id,ref'], ['setCover', cover, 'ref']]) {
    check(Object.keys(result).sort().join() === keys && typeof result.ref === 'string' && (result.id ?? note.id) === note.id,
      `${method} returned ${JSON.stringify(result)}`);
  }
  check(new Set([replaced.ref, patched.ref, removed.ref, cover.ref]).size === 4, 'two edits share a ref');
  await until('the edits saved', () => [replaced, patched, removed].every((r) => ben.eventsOf('saved').some((e) => e.ref === r.ref)));
  await until('the cover refused', () => ben.eventsOf('refused').some((e) => e.ref === cover.ref));
  const coverRefusal = ben.eventsOf('refused').find((e) => e.ref === cover.ref);
  check(coverRefusal.code === 'forbidden' && coverRefusal.edit?.kind === 'meta', `the cover's refusal: ${JSON.stringify(coverRefusal)}`);

  // complete(): refused for a writer, sealed for the owner, refused here once sealed.
  const denied = ben.complete();
  check(typeof denied.ref === 'string' && ben.frames.some((m) => m.type === 'complete' && m.ref === denied.ref), `complete sent no ref: ${JSON.stringify(denied)}`);
  await until('the writer\'s seal refused', () => ben.eventsOf('refused').some((e) => e.ref === denied.ref));
  const refusal = ben.eventsOf('refused').find((e) => e.ref === denied.ref);
  check(refusal.code === 'forbidden' && refusal.edit?.kind === 'complete' && !ben.state.completed, `the writer's seal: ${JSON.stringify(refusal)}`);
  const sealed = ann.complete();
  for (const [who, rp] of [['Ann', ann], ['Ben', ben]]) await until(`${who} to see the seal`, () => rp.eventsOf('completed').length === 1);
  const { ref, by } = ann.eventsOf('completed')[0];
  check(ref === sealed.ref && by === 'ann', `the owner's seal answered ${JSON.stringify({ ref, by })}, not ${sealed.ref}`);
  check(ben.eventsOf('completed')[0].ref === null, 'another member\'s seal carries a ref');
  const late = ben.complete();
  await until('a late seal refused here', () => ben.eventsOf('refused').some((e) => e.ref === late.ref));
  const lateRefusal = ben.eventsOf('refused').find((e) => e.ref === late.ref);
  check(lateRefusal.code === 'paper_completed' && lateRefusal.local && !ben.frames.some((m) => m.ref === late.ref), `the late seal: ${JSON.stringify(lateRefusal)}`);
  for (const rp of [ann, ben]) rp.close();

  // Not connected: nothing sent, no ref to follow.
  const idle = new RollingPaper({ url: authServer.url, paper, WebSocket });
  check(idle.complete().ref === null, 'complete() without a session returned a ref');
}

async function notAuthorisedIsNotOffline({ authServer }) {
  const paper = paperId('auth');
  const cases = [
    ['no token', {}, 'unauthorised'],
    ['a token signed with another secret', { token: jwt({ sub: 'x', paper, role: 'writer' }).slice(0, -4) + 'AAAA' }, 'unauthorised'],
    ['a token for another paper', { token: jwt({ sub: 'x', paper: 'other-paper', role: 'writer' }) }, 'forbidden'],
    ['a service token', { token: jwt({ sub: 'svc', paper, role: 'service' }) }, 'forbidden'],
  ];
  for (const [what, options, status] of cases) {
    const rp = client(authServer.url, paper, options);
    await until(`${what}: ${status}`, () => rp.state.status === status);
    check(rp.eventsOf('denied').length === 1, `${what}: no denied event`);
    check(!rp.isOpen && rp.urls.length === 1, `${what}: tried again after a refusal`);
    rp.close();
  }
  const owner = client(authServer.url, paper, { token: jwt({ sub: 'ann', paper, role: 'owner', name: 'Ann' }) });
  await online(owner);
  check(owner.state.role === 'owner' && owner.state.user === 'ann', 'the token\'s claims are not in the state');
  owner.close();
}

async function reconnectsAcrossARestartAndResumes({ redisServer }) {
  const paper = paperId('restart');
  const ann = client(redisServer.url, paper, { user: 'ann', name: 'Ann' });
  const ben = client(redisServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ann);
  await online(ben);
  const first = ann.create({ kind: 'text', text: 'Before the restart', author_name: 'Ann' });
  await until('the note saved', () => ann.eventsOf('saved').some((e) => e.ref === first.ref));
  await until('Ben to see it', () => ben.state.notes[first.id]?.v > 0);
  const seen = ann.state.lastV;

  // A dropped connection (the server stays): the server can resume from `since`.
  ann.abandonSocket();
  await until('Ann back', () => ann.eventsOf('snapshot').length === 2 && ann.isOpen);
  const resume = ann.eventsOf('snapshot')[1];
  check(new URL(ann.urls[1]).searchParams.get('since') === String(seen), `resumed with ${ann.urls[1]}`);
  check(resume.since === null || resume.since === seen, `a snapshot since ${resume.since}, not ${seen}`);
  check(ann.state.notes[first.id]?.data.text === 'Before the restart', 'the resumed snapshot lost the note');
  if (resume.since === null) console.log('client test: note: the server answered a resume with a full snapshot');

  await redisServer.stop();
  await until('both offline', () => ann.state.status === 'offline' && ben.state.status === 'offline');
  // Written while offline: shown at once, sent once the session is back.
  const offline = ann.create({ kind: 'text', text: 'Written offline', author_name: 'Ann' });
  check(ann.state.notes[offline.id]?.pending, 'an offline edit is not shown');
  await redisServer.start();
  await online(ann);
  await online(ben);
  const resumed = ann.urls.slice(1).find((u) => new URL(u).searchParams.get('since') === String(seen));
  check(resumed, `no reconnect sent since=${seen}: ${ann.urls.join(' ')}`);
  await until('the offline note saved', () => ann.eventsOf('saved').some((e) => e.ref === offline.ref));
  await until('Ben to see both notes', () => ben.state.notes[first.id]?.data.text === 'Before the restart'
    && ben.state.notes[offline.id]?.data.text === 'Written offline');
  check(ann.state.notes[first.id]?.data.text === 'Before the restart', 'Ann lost the first note');
  await until('members back', () => Object.keys(ann.state.members).length === 2);
  for (const rp of [ann, ben]) rp.close();
}

async function setNameReplacesTheSession({ redisServer }) {
  const paper = paperId('name');
  const ann = client(redisServer.url, paper, { user: 'ann' });
  const ben = client(redisServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ann);
  await online(ben);
  await until('Ben to see Ann', () => Object.values(ben.state.members).some((m) => m.user === 'ann'));
  check(new URL(ann.urls[0]).searchParams.get('name') === null, `a name was sent before one was set: ${ann.urls[0]}`);

  // Named right after writing: the note goes on the new session, and the
  // others see the name at once, without an offline spell in between.
  const note = ann.create({ kind: 'text', text: 'Written just before naming myself', author_name: 'Ann' });
  ann.setName('Ann');
  check(ann.state.status === 'connecting', `setName left the client ${ann.state.status}`);
  await online(ann);
  check(ann.urls.length === 2 && new URL(ann.urls[1]).searchParams.get('name') === 'Ann', `sessions opened: ${ann.urls.join(' ')}`);
  check(!ann.eventsOf('status').some((s) => s.status === 'offline'), 'the client went offline while renaming');
  await until('Ben to see Ann under her name', () => Object.values(ben.state.members).some((m) => m.user === 'ann' && m.name === 'Ann'));
  await until('Ben to see the note', () => ben.state.notes[note.id]?.data.text === 'Written just before naming myself');
  await until('the note saved', () => ann.state.pending === 0 && ann.state.notes[note.id]?.v > 0);
  await until('one Ann among the members', () => Object.values(ben.state.members).filter((m) => m.user === 'ann').length === 1);

  // Not connected: only the next session carries the name; a bad name throws.
  ann.close();
  ann.setName('Ann B');
  check(ann.urls.length === 2, 'setName opened a session on a closed client');
  let threw = false;
  try { ann.setName(42); } catch (err) { threw = err instanceof TypeError; }
  check(threw, 'setName(42) did not throw a TypeError');
  ann.connect();
  await online(ann);
  check(new URL(ann.urls[2]).searchParams.get('name') === 'Ann B', `the next session: ${ann.urls[2]}`);
  for (const rp of [ann, ben]) rp.close();
}

/** Runs a command to its end (killed after STEP_TIMEOUT_MS): `{code, stdout, stderr}`. */
function run(command, args, env = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => { stdout += chunk; });
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    const timer = setTimeout(() => child.kill('SIGKILL'), STEP_TIMEOUT_MS);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? signal, stdout, stderr });
    });
  });
}

/**
 * examples/node.mjs, run as its header says, against the server: it writes a
 * note, waits for its `saved`, prints the paper and exits 0; the server holds
 * the note. The server's address comes from the command line, then from RP_URL.
 */
async function theNodeExampleRuns({ redisServer }) {
  const paper = paperId('example');
  const script = fileURLToPath(new URL('../../examples/node.mjs', import.meta.url));
  const runs = [
    await run(process.execPath, [script, redisServer.url.replace(/^http/, 'ws'), paper]),
    await run(process.execPath, [script], { RP_URL: redisServer.url, RP_PAPER: paper }),
  ];
  const stored = await (await fetch(`${redisServer.url}/papers/${paper}`)).json();
  for (const [i, { code, stdout, stderr }] of runs.entries()) {
    check(code === 0, `examples/node.mjs exited with ${code}: ${stderr}${stdout}`);
    const saved = /^saved note (\S+) \(v (\d+)\)$/m.exec(stdout);
    check(saved, `no "saved note" line: ${stdout}`);
    check(stdout.includes(`paper ${paper}: ${i + 1} note(s)`) && stdout.includes(`  ${saved[1]}  Node example: Hello from Node, `),
      `the paper is not printed: ${stdout}`);
    check(stored.notes.some((n) => n.id === saved[1] && n.v === Number(saved[2])), `the server does not hold ${saved[1]}: ${JSON.stringify(stored)}`);
  }
}

// ---- A scripted server, for messages a healthy server rarely sends ----------------------------

async function scriptedEdgeCases() {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const url = `http://127.0.0.1:${wss.address().port}`;
  const sessions = [];
  wss.on('connection', (ws, req) => {
    const session = { ws, url: req.url, received: [] };
    ws.on('message', (data) => session.received.push(JSON.parse(String(data))));
    sessions.push(session);
  });
  const send = (session, msg) => session.ws.send(JSON.stringify(msg));
  const member = { id: 'c1', user: 'ann', name: 'Ann' };
  const note = (id, v, data) => ({ id, author: 'ann', data, v });
  try {
    const rp = client(url, 'scripted', { user: 'ann', name: 'Ann' });
    await until('a session', () => sessions.length === 1);
    const s1 = sessions[0];
    send(s1, {
      type: 'snapshot', paper: 'scripted', you: 'c1', completed: false, meta: { data: { title: 'T' }, v: 5 },
      notes: [note('n1', 10, { text: 'one' }), note('n2', 11, { text: 'two' })], members: [member],
    });
    await online(rp);
    check(rp.state.cover.data.title === 'T' && Object.keys(rp.state.notes).join() === 'n1,n2', 'the snapshot is not the state');

    // Two edits, confirmed by one `saved`; a third fails for good.
    const a = rp.create({ text: 'three' }, { id: 'n3' });
    rp.flush();
    const { ref: b } = rp.patch('n1', { x: 5 });
    rp.flush();
    await until('three... edits sent', () => s1.received.length === 2);
    check(s1.received[1].type === 'patch' && s1.received[1].data.x === 5, 'the patch was not sent as one');
    const { ref: c } = rp.patch('n2', { text: 'TWO' });
    rp.flush();
    await until('the third edit sent', () => s1.received.length === 3);
    send(s1, { type: 'upsert', id: 'n3', author: 'ann', data: { text: 'three' }, v: 20, from: 'c1', ref: a.ref });
    send(s1, { type: 'patch', id: 'n1', data: { x: 5 }, v: 21, from: 'c1', ref: b });
    send(s1, { type: 'patch', id: 'n2', data: { text: 'TWO' }, v: 22, from: 'c1', ref: c });
    send(s1, { type: 'saved', v: 21 });
    await until('two saved', () => rp.eventsOf('saved').length === 2);
    send(s1, { type: 'error', code: 'write_failed', message: 'refused by Redis', ref: c });
    await until('write_failed', () => rp.eventsOf('write_failed').some((e) => e.ref === c));
    check(rp.eventsOf('refused').some((e) => e.code === 'write_failed'), 'write_failed is not a refusal event');
    check(rp.state.pending === 0, 'settled edits still pending');

    // Field versions: an upsert older than a patched field keeps that field.
    send(s1, { type: 'patch', id: 'n1', data: { y: 9 }, v: 40, from: 'c2' });
    send(s1, { type: 'upsert', id: 'n1', author: 'ann', data: { text: 'ONE', y: 1 }, v: 35, from: 'c2' });
    await until('the upsert applied', () => rp.state.notes.n1.data.text === 'ONE');
    check(rp.state.notes.n1.data.y === 9, 'an older upsert undid a newer patch of a field');

    // A snapshot in mid-session (after a Redis refusal) replaces the view.
    send(s1, { type: 'snapshot', paper: 'scripted', you: 'c1', completed: false, notes: [note('n1', 41, { text: 'only' })], members: [member] });
    await until('the view replaced', () => Object.keys(rp.state.notes).join() === 'n1' && rp.state.notes.n1.data.text === 'only');
    check(rp.state.cover.v === 0, 'a snapshot without meta kept the old cover');

    // A seal with no answer when its session drops: `unconfirmed`, never sent again.
    const unanswered = rp.complete();
    await until('the complete sent with its ref', () => s1.received.some((m) => m.type === 'complete' && m.ref === unanswered.ref));

    // The connection drops: the next session resumes with `since`, and merges.
    s1.ws.close(1001);
    await until('the unanswered seal reported', () => rp.eventsOf('unconfirmed').some((e) => e.ref === unanswered.ref));
    check(rp.eventsOf('unconfirmed').find((e) => e.ref === unanswered.ref).kind === 'complete', 'the unconfirmed seal is not a complete');
    await until('a second session', () => sessions.length === 2);
    const s2 = sessions[1];
    check(new URLSearchParams(s2.url.split('?')[1]).get('since') === '41', `resumed with ${s2.url}`);
    const { ref: offline } = rp.patch('n1', { color: '#fff' });
    send(s2, {
      type: 'snapshot', paper: 'scripted', you: 'c9', completed: false, since: 41, meta: { data: { title: 'U' }, v: 50 },
      notes: [{ id: 'n5', deleted: true, v: 51 }, note('n4', 52, { text: 'four' })], members: [member],
    });
    await until('the merged view', () => Object.keys(rp.state.notes).sort().join() === 'n1,n4');
    check(rp.state.cover.data.title === 'U' && rp.state.you === 'c9', 'the resumed snapshot did not apply');
    await until('the edit made offline sent', () => s2.received.some((m) => m.ref === offline));

    check(!s2.received.some((m) => m.type === 'complete'), 'a complete was sent again');

    // The seal's notes replace the view; the seal answers this client's complete.
    const seal = rp.complete();
    await until('the complete sent', () => s2.received.some((m) => m.type === 'complete' && m.ref === seal.ref));
    send(s2, { type: 'completed', by: 'ann', notes: [note('n4', 60, { text: 'sealed four' })] });
    await until('sealed', () => rp.state.completed && Object.keys(rp.state.notes).join() === 'n4');
    check(rp.state.notes.n4.data.text === 'sealed four', 'the sealed notes did not replace the view');
    check(rp.eventsOf('completed')[0].ref === seal.ref, `the seal carries ${rp.eventsOf('completed')[0].ref}, not ${seal.ref}`);
    // The same answer again (the complete reached the server after the seal) is no news.
    send(s2, { type: 'error', code: 'paper_completed', message: 'the paper is completed', ref: seal.ref });
    send(s2, { type: 'pong' });
    await until('the pong after it', () => rp.eventsOf('pong').length === 1);
    check(!rp.eventsOf('refused').some((e) => e.ref === seal.ref), 'an answered seal was also refused');
    rp.close();
  } finally {
    for (const s of sessions) s.ws.terminate();
    await new Promise((r) => wss.close(r));
  }
}

/**
 * Two scripted nodes behind one address, as a load balancer would spread
 * sessions: the second node's versions are lower than the first's (its
 * clock is behind, or the edits it stamps come from a paper it just loaded).
 * A `saved` of the first session must never confirm an edit of the second.
 */
async function savedDoesNotCarryOverToAnotherNode() {
  const nodes = [];
  for (let i = 0; i < 2; i += 1) {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    const node = { wss, sessions: [] };
    wss.on('connection', (ws) => {
      const session = { ws, received: [] };
      ws.on('message', (data) => session.received.push(JSON.parse(String(data))));
      node.sessions.push(session);
    });
    nodes.push(node);
  }
  const ports = nodes.map((n) => n.wss.address().port);
  // The first session goes to node a, every later one to node b.
  let opened = 0;
  const balanced = class extends WebSocket {
    constructor(url) {
      opened += 1;
      super(url.replace(`:${ports[0]}/`, `:${ports[opened === 1 ? 0 : 1]}/`));
    }
  };
  const send = (session, msg) => session.ws.send(JSON.stringify(msg));
  const snapshot = (you) => ({ type: 'snapshot', paper: 'two-nodes', you, completed: false, notes: [], members: [] });
  try {
    const rp = client(`http://127.0.0.1:${ports[0]}`, 'two-nodes', { user: 'ann', name: 'Ann', WebSocket: balanced, resume: false });
    await until('a session on node a', () => nodes[0].sessions.length === 1);
    const a = nodes[0].sessions[0];
    send(a, snapshot('c1'));
    await online(rp);
    const first = rp.create({ text: 'on a' }, { id: 'n1' });
    rp.flush();
    await until('the edit sent to node a', () => a.received.some((m) => m.ref === first.ref));
    send(a, { type: 'upsert', id: 'n1', author: 'ann', data: { text: 'on a' }, v: 9000, from: 'c1', ref: first.ref });
    send(a, { type: 'saved', v: 9000 });
    await until('n1 saved on node a', () => rp.eventsOf('saved').some((e) => e.ref === first.ref));

    // Node a goes away; the client reconnects, to node b.
    a.ws.close(1001);
    await until('a session on node b', () => nodes[1].sessions.length === 1);
    const b = nodes[1].sessions[0];
    send(b, snapshot('c7'));
    await until('online on node b', () => rp.state.you === 'c7' && rp.isOpen);
    const second = rp.create({ text: 'on b' }, { id: 'n2' });
    rp.flush();
    await until('the edit sent to node b', () => b.received.some((m) => m.ref === second.ref));
    // Node b applies it at a version below what node a saved, and has not saved it yet.
    send(b, { type: 'upsert', id: 'n2', author: 'ann', data: { text: 'on b' }, v: 500, from: 'c7', ref: second.ref });
    send(b, { type: 'join', member: { id: 'c8', user: 'bob', name: 'Bob' } });
    await until('the echo and the join read', () => rp.eventsOf('join').length === 1);
    check(!rp.eventsOf('saved').some((e) => e.ref === second.ref), 'node a\'s saved confirmed an edit node b never saved');
    check(rp.state.pending === 1, `pending ${rp.state.pending}, not 1`);
    send(b, { type: 'saved', v: 500 });
    await until('n2 saved on node b', () => rp.eventsOf('saved').some((e) => e.ref === second.ref));
    rp.close();
  } finally {
    for (const node of nodes) {
      for (const s of node.sessions) s.ws.terminate();
      await new Promise((r) => node.wss.close(r));
    }
  }
}

// ---- 1.2: the main backend ends sessions for good (4403, 4410) ------------------------------

/**
 * 4403 and 4410 from a scripted server: no reconnection, an `ended` event,
 * and each edit still held reported `unconfirmed`: applied (with its `v`),
 * sent without an answer, and held back by the edit interval (`v` 0).
 */
async function endingsFromAScriptedServer() {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const url = `http://127.0.0.1:${wss.address().port}`;
  const sessions = [];
  wss.on('connection', (ws) => {
    const session = { ws, received: [] };
    ws.on('message', (data) => session.received.push(JSON.parse(String(data))));
    sessions.push(session);
  });
  const send = (session, msg) => session.ws.send(JSON.stringify(msg));
  try {
    for (const [code, status] of [[4403, 'revoked'], [4410, 'erased']]) {
      const first = sessions.length;
      // Edits wait a minute between sends unless flushed: the last one stays queued.
      const rp = client(url, 'scripted-end', { user: 'ann', name: 'Ann', editIntervalMs: 60_000 });
      await until('a session', () => sessions.length === first + 1);
      const s = sessions[first];
      send(s, {
        type: 'snapshot', paper: 'scripted-end', you: 'c1', completed: false,
        notes: [{ id: 'n1', author: 'ann', data: { text: 'one' }, v: 10 }], members: [{ id: 'c1', user: 'ann', name: 'Ann' }],
      });
      await online(rp);
      const { ref: applied } = rp.patch('n1', { text: 'ONE' });
      rp.flush();
      const sent = rp.create({ text: 'two' }, { id: 'n2' });
      rp.flush();
      await until('two edits sent', () => s.received.length === 2);
      send(s, { type: 'patch', id: 'n1', data: { text: 'ONE' }, v: 20, from: 'c1', ref: applied });
      await until('the patch applied', () => rp.eventsOf('applied').some((e) => e.ref === applied));
      const held = rp.create({ text: 'three' }, { id: 'n3' });
      check(rp.state.pending === 3 && rp.state.notes.n3?.pending, `pending ${rp.state.pending}, not 3`);

      s.ws.close(code, 'ended by the main backend');
      await until(`status ${status}`, () => rp.eventsOf('ended').length === 1);
      checkEnded(rp, code, status);
      check(rp.eventsOf('ended')[0].reason === 'ended by the main backend', 'the close frame\'s text is not the reason');
      const reported = rp.eventsOf('unconfirmed').map((e) => `${e.ref}:${e.v}:${e.status}`).sort();
      const expected = [`${applied}:20:unconfirmed`, `${sent.ref}:0:unconfirmed`, `${held.ref}:0:unconfirmed`].sort();
      check(reported.join() === expected.join(), `unconfirmed ${reported.join()}, not ${expected.join()}`);
      // The view is the server's state as last received: the applied patch, not the unanswered notes.
      check(Object.keys(rp.state.notes).join() === 'n1' && rp.state.notes.n1.data.text === 'ONE' && !rp.state.notes.n1.pending,
        `the view after the end: ${JSON.stringify(rp.state.notes)}`);
      const opened = rp.urls.length;
      rp.reconnectNow();
      await new Promise((r) => setTimeout(r, NO_RECONNECT_WINDOW_MS)); // the window watched, not a synchronisation
      check(sessions.length === first + 1 && rp.urls.length === opened, `${code}: the client reconnected`);
      check(rp.state.status === status, `${code}: the status became ${rp.state.status}`);
      check(s.received.length === 2, `${code}: sent after the end: ${JSON.stringify(s.received.slice(2))}`);
      rp.close();
    }
  } finally {
    for (const s of sessions) s.ws.terminate();
    await new Promise((r) => wss.close(r));
  }
}

/**
 * The main backend revokes a user (`POST /api/papers/{paper}/revoke`): that
 * user's session is closed with 4403 and does not come back; the edit it had
 * not sent is reported `unconfirmed`; another user of the paper stays.
 */
async function revokedUserDoesNotReconnect({ apiServer }) {
  await running(apiServer);
  const paper = paperId('revoked');
  // Edits wait a minute between sends unless flushed: the second one stays queued.
  const eve = client(apiServer.url, paper, { user: 'eve', name: 'Eve', editIntervalMs: 60_000 });
  const ben = client(apiServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(eve);
  await online(ben);
  await until('Ben to see Eve', () => Object.values(ben.state.members).some((m) => m.user === 'eve'));
  const kept = eve.create({ kind: 'text', text: 'Written before', author_name: 'Eve' });
  eve.flush();
  await until('the first note saved', () => eve.eventsOf('saved').some((e) => e.ref === kept.ref));
  const held = eve.create({ kind: 'text', text: 'Never sent', author_name: 'Eve' });
  check(eve.state.notes[held.id]?.pending && eve.state.pending === 1, 'the second note is not shown as pending');

  const answer = await api(apiServer, 'POST', `/api/papers/${paper}/revoke`, { user: 'eve' });
  check(answer.status === 204, `revoke answered ${answer.status} ${answer.text}`);
  await until('Eve\'s session to end', () => eve.eventsOf('ended').length === 1);
  checkEnded(eve, 4403, 'revoked');
  const reported = eve.eventsOf('unconfirmed');
  check(reported.length === 1 && reported[0].ref === held.ref && reported[0].v === 0, `unconfirmed ${JSON.stringify(reported)}`);
  check(!eve.state.notes[held.id] && eve.state.notes[kept.id]?.v > 0, 'the view after the end is not the server\'s state');
  // Only Eve's sessions end.
  await until('Ben to see Eve leave', () => !Object.values(ben.state.members).some((m) => m.user === 'eve'));
  check(ben.isOpen && ben.eventsOf('ended').length === 0 && ben.eventsOf('close').length === 0, 'Ben\'s session ended too');
  await staysEnded(apiServer, [eve], 'revoked');
  check(ben.isOpen && ben.state.notes[kept.id]?.v > 0, 'Ben lost the session or the note');
  for (const rp of [eve, ben]) rp.close();
}

/**
 * The main backend erases a paper (`DELETE /api/papers/{paper}`): every
 * session of it is closed with 4410 and none comes back; an edit not sent
 * yet is reported `unconfirmed`.
 */
async function erasedPaperEndsEverySession({ apiServer }) {
  await running(apiServer);
  const paper = paperId('erased');
  const ann = client(apiServer.url, paper, { user: 'ann', name: 'Ann', editIntervalMs: 60_000 });
  const ben = client(apiServer.url, paper, { user: 'ben', name: 'Ben' });
  await online(ann);
  await online(ben);
  const note = ann.create({ kind: 'text', text: 'Happy birthday!', author_name: 'Ann' });
  ann.flush();
  await until('the note saved', () => ann.eventsOf('saved').some((e) => e.ref === note.ref));
  await until('Ben to see the note', () => ben.state.notes[note.id]?.v > 0);
  const { ref: held } = ann.patch(note.id, { text: 'Happy birthday, Kim!' });
  check(ann.state.notes[note.id].pending && ann.state.pending === 1, 'the patch is not shown as pending');

  const answer = await api(apiServer, 'DELETE', `/api/papers/${paper}`);
  check(answer.status === 204, `erase answered ${answer.status} ${answer.text}`);
  for (const rp of [ann, ben]) {
    await until(`${rp.options.name}'s session to end`, () => rp.eventsOf('ended').length === 1);
    checkEnded(rp, 4410, 'erased');
  }
  const reported = ann.eventsOf('unconfirmed');
  check(reported.length === 1 && reported[0].ref === held && reported[0].v === 0, `unconfirmed ${JSON.stringify(reported)}`);
  check(ann.state.notes[note.id]?.data.text === 'Happy birthday!', 'the unsent patch is still shown');
  check(ben.eventsOf('unconfirmed').length === 0, 'Ben had nothing to report');
  await staysEnded(apiServer, [ann, ben], 'erased');
  for (const rp of [ann, ben]) rp.close();
}

// ---- Runner ------------------------------------------------------------------------------

async function main() {
  const redisServer = new Server('server', ['--store', 'redis', '--redis', config.redis, '--threads', '2']);
  const authServer = new Server('auth-server', ['--store', 'memory', '--threads', '1', '--jwt-secret', SECRET]);
  // 1.2's backend API on: started by the first scenario that needs it.
  const apiServer = new Server('api-server', ['--store', 'redis', '--redis', config.redis, '--threads', '1', '--api-key', API_KEY]);
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  try {
    await Promise.all([redisServer.start(), authServer.start()]);
    const v11 = await speaks11(redisServer.url);
    const scenarios = [
      ['the state follows the server: optimistic edits, saved one by one, signatures after leaving', optimisticEditsAreSavedOneByOne],
      ['refusals are typed events and undo optimistic edits', refusalsAreTypedAndRolledBack],
      ['edits return {ref} (and the note\'s id), refuse data that is not an object, and complete\'s outcome carries its ref', editsReturnRefsAndRefuseNonObjects],
      ['examples/node.mjs writes a note, waits for its saved, prints the paper and exits 0', theNodeExampleRuns],
      ['sealing replaces the view with the sealed notes', completingWithoutCover],
      ['1.1: drag and type of one note at once keep both (patch)', dragAndTypeAtOnceKeepBoth, 'patch'],
      ['1.1: the cover is shared, and sealing replaces the view', coverIsSharedAndSealingReplacesTheView, 'meta'],
      ['401 and 403 are told from offline', notAuthorisedIsNotOffline],
      ['edge cases from a scripted server: saved, write_failed, field versions, mid-session snapshot, since, seal', scriptedEdgeCases],
      ['reconnects across a server restart, resumes with since, sends edits made offline', reconnectsAcrossARestartAndResumes],
      ['setName replaces the session with one under the new name; the edits held go on it', setNameReplacesTheSession],
      ['a saved of one node never confirms an edit made on another', savedDoesNotCarryOverToAnotherNode],
      ['1.2: 4403 and 4410 from a scripted server end the session for good, reporting every edit held', endingsFromAScriptedServer],
      ['1.2: a user revoked through the backend API is closed with 4403 and does not reconnect', revokedUserDoesNotReconnect],
      ['1.2: a paper erased through the backend API closes every session with 4410, none reconnects', erasedPaperEndsEverySession],
    ];
    for (const [name, run, needs11] of scenarios) {
      if (needs11 && !v11[needs11] && process.env.RP_ALLOW_10) {
        skipped += 1;
        console.log(`client test: SKIP ${name} (the server does not speak 1.1's ${needs11} yet)`);
        continue;
      }
      const started = Date.now();
      try {
        await run({ redisServer, authServer, apiServer });
        passed += 1;
        console.log(`client test: ok   ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
      } catch (err) {
        failed += 1;
        console.error(`client test: FAIL ${name}\n  ${err.stack}`);
        if (!redisServer.child) await redisServer.start().catch(() => {});
      } finally {
        for (const rp of clients) rp.close();
        clients.clear();
      }
    }
  } finally {
    await Promise.all([redisServer.stop(), authServer.stop(), apiServer.stop()])
      .catch(() => { redisServer.kill(); authServer.kill(); apiServer.kill(); });
  }
  console.log(`client test: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
  return failed === 0 ? 0 : 1;
}

const watchdog = setTimeout(() => {
  console.error(`client test: FAIL the run took over ${GLOBAL_TIMEOUT_MS / 1000} s`);
  process.exit(1);
}, GLOBAL_TIMEOUT_MS);
main().then((code) => {
  clearTimeout(watchdog);
  process.exit(code);
}, (err) => {
  console.error(`client test: FAIL ${err.stack}`);
  process.exit(1);
});
