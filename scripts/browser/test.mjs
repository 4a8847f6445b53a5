// End-to-end test of the page served at `/`, in headless Chromium driven by
// playwright-core, as a group sending a card uses it. People open the same
// card in separate browser contexts. Someone starts a card from the landing
// page (an unguessable id) and sets its cover; everyone is asked their name
// once, before their first note (with a token, its name is used), and notes
// are signed with it; what one
// writes, drags, recolours or deletes appears at the others; a note dragged by
// one while another types in it keeps both changes (field patches);
// signatures stay after their author leaves; notes written or edited offline
// show as waiting and are sent on reconnection; in the free layout new notes
// land in free space, keep their size, tilt, and emoji-only notes are larger;
// Korean renders with real glyphs; a phone shows the cover and the first note
// without scrolling, and nothing wraps at 1280 px with 12 people; sealing
// shows the final card and a keepsake for its recipient, which prints to a
// clean multi-page PDF (checked with poppler's pdftoppm and pdftotext). A
// card that cannot be shown gets a page of its own, without the card's
// controls: not authorised (401), access removed (4403) or card deleted
// (4410) through the backend API (without reconnecting), a link that names no
// card, and the keepsake of a card nobody wrote on yet. After a server
// restart the pages come back by themselves with every note. And
// examples/browser.html, served as its header says (a static server on
// another origin), writes a note and sees it saved.
//
// Every view is checked with axe-core (no violation at any impact) and
// photographed at 1280x800 and 390x844. The servers are started and
// restarted here (scripts/browser-test.sh starts Redis and passes its URL).
//
// Every wait is a condition with a deadline; nothing sleeps to synchronise.
//
// Environment: RP_BIN (server binary), RP_REDIS (redis URL), RP_PORT and
// RP_AUTH_PORT (ports for the server and for one with auth on), RP_WORK (a
// scratch directory), RP_SCREENSHOTS (where screenshots go), CHROMIUM
// (default /usr/bin/chromium).

// (default /usr/bin/chromium).

import { execFile, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { openSync, readFileSync, readdirSync, writeFileSync, mkdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer as createHttpServer } from 'node:http';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const GLOBAL_TIMEOUT_MS = 420_000;
const STEP_TIMEOUT_MS = 15_000;
// Pages back off up to 10 s between attempts while the server is away.
const RECONNECT_TIMEOUT_MS = 30_000;
const SERVER_EXIT_TIMEOUT_MS = 20_000;
// PROTOCOL.md 7: at least 32 bytes.
const API_KEY = 'browser-test-api-key-0123456789abcdef';
// The secret of the server with auth on (PROTOCOL.md 5).
const JWT_SECRET = 'browser-test-secret-0123456789';
const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  // Without these Chromium keeps calling home, which a closed network punishes.
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set; run scripts/browser-test.sh`);
  return value;
};
const config = {
  bin: env('RP_BIN'),
  redis: env('RP_REDIS'),
  port: Number(env('RP_PORT')),
  work: env('RP_WORK'),
  screenshots: env('RP_SCREENSHOTS'),
  chromium: env('CHROMIUM', '/usr/bin/chromium'),
};
const base = `http://127.0.0.1:${config.port}`;

// ---- The server under test ---------------------------------------------------

class Server {
  /** `args` replace the Redis store; `name` names its log and pid files in RP_WORK. */
  constructor({ port = config.port, name = 'server', args = null } = {}) {
    this.port = port;
    this.name = name;
    this.args = args ?? ['--store', 'redis', '--redis', config.redis];
    this.child = null;
    this.exited = null;
    this.log = openSync(join(config.work, `${name}.log`), 'a');
  }

  async start() {
    const child = spawn(config.bin, [
      '--listen', `127.0.0.1:${this.port}`, ...this.args, '--log-level', 'info',
    ], { stdio: ['ignore', this.log, this.log] });
    this.child = child;
    // The shell script kills this pid on exit, should this process die first.
    writeFileSync(join(config.work, `${this.name}.pid`), String(child.pid));
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    await waitForHealthy(this.exited, `http://127.0.0.1:${this.port}`);
  }

  /** SIGTERM, then waits for the process to be gone (it flushes its backlog first). */
  async stop() {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return null;
    this.child.kill('SIGTERM');
    const outcome = await withDeadline(this.exited, SERVER_EXIT_TIMEOUT_MS, 'the server to exit after SIGTERM');
    this.child = null;
    return outcome;
  }

  kill() {
    if (this.child && this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

async function waitForHealthy(exited, origin) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  let gone = null;
  exited.then((how) => { gone = how; });
  while (Date.now() < deadline) {
    if (gone) throw new Error(`the server exited at start (${JSON.stringify(gone)}); see server.log`);
    try {
      const res = await fetch(`${origin}/healthz`);
      if (res.ok) return;
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 50)); // poll interval of a condition with a deadline
  }
  throw new Error(`the server did not answer /healthz within ${STEP_TIMEOUT_MS} ms`);
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

/** A request to the backend API (PROTOCOL.md 7) with the API key: `{status, text}`. */
async function backendApi(server, method, path, body) {
  const headers = { Authorization: `Bearer ${API_KEY}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(`http://127.0.0.1:${server.port}${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, text: await res.text() };
}

function withDeadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---- Page helpers ----------------------------------------------------------------

/** Waits until `predicate(arg)` holds in the page; the error names what was awaited. */
async function waitUntil(page, what, predicate, arg, timeout = STEP_TIMEOUT_MS) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 'raf' });
  } catch (err) {
    throw new Error(`${page.label}: timed out waiting for ${what} (${timeout} ms)`, { cause: err });
  }
}

async function waitOnline(page, timeout = STEP_TIMEOUT_MS) {
  await waitUntil(page, 'the connection to be live',
    () => document.querySelector('[data-testid=status]')?.dataset.connection === 'online', null, timeout);
}

async function waitNoteText(page, id, text, timeout = STEP_TIMEOUT_MS) {
  await waitUntil(page, `note ${id} to read ${JSON.stringify(text)}`, ([id, text]) => {
    const body = document.querySelector(`[data-note-id="${id}"] [data-testid=note-text]`);
    return body !== null && (body.value ?? body.textContent) === text;
  }, [id, text], timeout);
}

async function notePosition(page, id) {
  return page.evaluate((id) => {
    const card = document.querySelector(`[data-note-id="${id}"]`);
    return card && { x: parseFloat(card.style.left), y: parseFloat(card.style.top) };
  }, id);
}

async function waitNoteAt(page, id, at, timeout = STEP_TIMEOUT_MS) {
  await waitUntil(page, `note ${id} at (${at.x}, ${at.y})`, ([id, at]) => {
    const card = document.querySelector(`[data-note-id="${id}"]`);
    return card !== null && parseFloat(card.style.left) === at.x && parseFloat(card.style.top) === at.y;
  }, [id, at], timeout);
}

async function waitMember(page, name) {
  await waitUntil(page, `member ${name} in the list`, (name) =>
    [...document.querySelectorAll('[data-testid=member-name]')].some((m) => m.textContent === name), name);
}

async function screenshot(page, name) {
  const path = join(config.screenshots, `${name}.png`);
  await page.screenshot({ path });
  return path;
}

/** Opens a page that records uncaught errors and any request leaving the server(s) under test. */
const openPages = new Set();

async function openPage(browser, label, problems, contextOptions = {}, origin = base) {
  const origins = [origin].flat();
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...contextOptions });
  const page = await context.newPage();
  openPages.add(page);
  page.on('close', () => openPages.delete(page));
  page.label = label;
  page.on('pageerror', (err) => problems.push(`${label}: uncaught error in the page: ${err.message}`));
  page.on('request', (req) => {
    const url = req.url();
    if (!origins.some((o) => url.startsWith(o) || url.startsWith(o.replace(/^http/, 'ws'))) && !url.startsWith('data:')) {
      problems.push(`${label}: the page requested ${url}, outside the server`);
    }
  });
  return page;
}

const AXE_SOURCE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');


/**
 * Runs axe-core in the page (WCAG 2.1 A and AA, and best practices) and fails
 * on any violation, whatever its impact; `what` names the view in the error.
 */
async function checkAccessibility(page, what) {
  // Evaluated through the debugging protocol, which the page's CSP does not govern.
  await page.evaluate(AXE_SOURCE);
  const violations = await page.evaluate(async () => {
    const result = await window.axe.run(document, {
      runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] },
      resultTypes: ['violations'],
    });
    return result.violations
      .map((v) => `${v.impact} ${v.id}: ${v.help} (${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join('; ')})`);
  });
  if (violations.length) throw new Error(`${page.label}: accessibility of ${what}:\n  ${violations.join('\n  ')}`);
}

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

/**
 * One view of the page, as it is now: checked with axe-core and photographed
 * at 1280x800 and at 390x844 (`name`-desktop.png, `name`-phone.png); the
 * page's own size is restored after.
 */
async function captureView(page, shots, name, what) {
  const own = page.viewportSize();
  for (const [size, suffix] of [[DESKTOP, 'desktop'], [PHONE, 'phone']]) {
    await page.setViewportSize(size);
    // Layout settles in the next frames (fitted notes, the free sheet).
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    await checkAccessibility(page, `${what} at ${size.width}x${size.height}`);
    shots.push(await screenshot(page, `${name}-${suffix}`));
  }
  await page.setViewportSize(own);
}

/** Waits for a new note to take focus, answering the name prompt (once per person) when it comes. */
async function focusNewNote(page, before) {
  await waitUntil(page, 'a new note to take focus, or the name prompt', () =>
    document.activeElement?.closest('[data-testid=note]') != null
    || !document.querySelector('[data-testid=name-prompt]').hidden);
  const prompted = await page.evaluate(() => !document.querySelector('[data-testid=name-prompt]').hidden);
  if (prompted) {
    if (!page.personName) throw new Error(`${page.label}: asked for a name, and the test gave this person none`);
    if (page.named) throw new Error(`${page.label}: asked for a name a second time`);
    if (!await page.evaluate(() => document.activeElement?.dataset.testid === 'prompt-name')) {
      throw new Error(`${page.label}: the name prompt does not have the focus`);
    }
    await page.keyboard.type(page.personName);
    await page.keyboard.press('Enter');
    page.named = true;
    await waitUntil(page, 'a new note to take focus', () => document.activeElement?.closest('[data-testid=note]') != null);
  }
  const id = await page.evaluate(() => document.activeElement.closest('[data-testid=note]').dataset.noteId);
  if (before.includes(id)) throw new Error(`${page.label}: the focused note ${id} is not a new one`);
  return id;
}

async function noteIds(page) {
  return page.locator('[data-testid=note]').evaluateAll((cards) => cards.map((c) => c.dataset.noteId));
}

/** Writes a note as a person does: "Write a note", the name if asked, then the text typed key by key. */
async function addNote(page, text, { fast = false } = {}) {
  const before = await noteIds(page);
  await page.getByTestId('add-note').click();
  const id = await focusNewNote(page, before);
  // Typed key by key, so that the live updates of typing are what is tested
  // (or inserted at once where only the result matters).
  if (fast) await page.keyboard.insertText(text);
  else await page.keyboard.type(text, { delay: 15 });
  return id;
}

async function dragNote(page, id, dx, dy) {
  const handle = page.locator(`[data-note-id="${id}"] [data-testid=note-handle]`);
  // A person scrolls to the note before dragging it: the sheet is larger than the window.
  await handle.scrollIntoViewIfNeeded();
  const box = await handle.boundingBox();
  const from = { x: box.x + box.width / 2, y: box.y + box.height / 2 };
  await page.mouse.move(from.x, from.y);
  await page.mouse.down();
  await page.mouse.move(from.x + dx, from.y + dy, { steps: 12 });
  await page.mouse.up();
}

/** Opens a card's address as `name` (who answers the name prompt at their first note). */
async function openPaperAs(page, url, name) {
  page.personName = name;
  await page.goto(url);
  await waitOnline(page);
}

async function useFreeLayout(page) {
  await page.getByTestId('layout-free').click();
  await waitUntil(page, 'the free layout', () => document.querySelector('[data-testid=board]').dataset.layout === 'free'
    && document.querySelector('[data-testid=layout-free]').getAttribute('aria-pressed') === 'true');
}

async function waitSaved(page) {
  await waitUntil(page, 'all changes saved', () => document.querySelector('[data-testid=status]')?.dataset.state === 'saved');
}

async function setCover(page, { title, to, occasion }) {
  if (await page.getByTestId('cover-form').isHidden()) await page.getByTestId('edit-cover').click();
  await page.getByTestId('cover-title-input').fill(title);
  await page.getByTestId('cover-to-input').fill(to);
  await page.getByTestId('cover-occasion-input').fill(occasion);
  await page.getByTestId('cover-save').click();
  await waitUntil(page, 'the cover', (title) => document.querySelector('[data-testid=cover-title]').textContent === title, title);
}

async function blur(page) {
  await page.evaluate(() => document.activeElement?.blur());
}

/** The messages a page sends on its WebSocket, parsed. */
function recordSent(page) {
  const sent = [];
  page.on('websocket', (ws) => ws.on('framesent', (frame) => {
    try { sent.push(JSON.parse(frame.payload)); } catch { /* not JSON */ }
  }));
  return sent;
}

/** Boxes of the notes as laid out (offsets, before their tilt), by id. */
async function noteBoxes(page) {
  return page.evaluate(() => [...document.querySelectorAll('[data-testid=note]')].map((n) => ({
    id: n.dataset.noteId, x: n.offsetLeft, y: n.offsetTop, width: n.offsetWidth, height: n.offsetHeight,
  })));
}

function overlapping(boxes) {
  const pairs = [];
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
      const [a, b] = [boxes[i], boxes[j]];
      if (a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height) pairs.push(`${a.id}/${b.id}`);
    }
  }
  return pairs;
}

function run(command, args) {
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${command} ${args.join(' ')} failed: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}

// ---- Scenarios -------------------------------------------------------------------

const PAPER_ID = /^[A-Za-z0-9_-]{16,64}$/;

async function twoPeopleWriteTogether({ browser, server, problems, shots }) {
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  ann.personName = 'Ann';

  // Ann starts a card: the landing page makes an id nobody can guess, and goes to it.
  await ann.goto(`${base}/`);
  await captureView(ann, shots, '01-landing', 'the landing page');
  await ann.getByTestId('start-card').click();
  await waitOnline(ann);
  const paper = new URL(ann.url()).searchParams.get('paper');
  if (!PAPER_ID.test(paper) || paper.length < 16) throw new Error(`the card's id ${paper} is not 16+ random base64url characters`);
  await ben.goto(`${base}/`);
  await ben.getByTestId('start-card').click();
  await waitOnline(ben);
  const other = new URL(ben.url()).searchParams.get('paper');
  if (other === paper || !PAPER_ID.test(other)) throw new Error(`a second card got the id ${other} (the first: ${paper})`);

  // A new card asks who it is for; empty, it invites the first note rather than showing an error.
  await waitUntil(ann, 'the cover form, open on a new card', () =>
    !document.querySelector('[data-testid=cover-form]').hidden && document.activeElement?.dataset.testid === 'cover-title-input'
    && !document.querySelector('[data-testid=empty-state]').hidden);
  await captureView(ann, shots, '02-new-card', 'a new card, asking who it is for');
  await setCover(ann, { title: 'Happy birthday, Kim!', to: 'Kim', occasion: 'Birthday' });
  await waitUntil(ann, 'the inviting empty card', () => {
    const empty = document.querySelector('[data-testid=empty-state]');
    return !empty.hidden && /first/.test(empty.textContent) && document.querySelector('[data-testid=invite]').offsetHeight > 0
      && document.querySelector('[data-testid=ended]').hidden;
  });
  await blur(ann);
  await captureView(ann, shots, '03-empty-card', 'an empty card');

  // Ben follows the shared link.
  const shared = ann.url();
  if (!shared.includes(`paper=${paper}`)) throw new Error(`the address ${shared} does not name the paper`);
  await openPaperAs(ben, shared, 'Ben');
  await useFreeLayout(ann);
  await useFreeLayout(ben);

  // Before her first note, Ann is asked her name, once.
  await ann.getByTestId('add-note').click();
  await waitUntil(ann, 'the name prompt', () => !document.querySelector('[data-testid=name-prompt]').hidden
    && document.activeElement?.dataset.testid === 'prompt-name');
  await captureView(ann, shots, '04-name-prompt', 'the name prompt');
  await ann.getByTestId('prompt-name').focus();
  const before = await noteIds(ann);
  await ann.keyboard.type('Ann');
  await ann.keyboard.press('Enter');
  ann.named = true;
  const id = await focusNewNote(ann, before);

  // A note typed by Ann appears, with its text and her name, at Ben's; Ben cannot edit it.
  const text = 'Happy birthday, Kim! 🎂 Thank you for every Friday cake.';
  await ann.keyboard.type(text, { delay: 15 });
  await waitNoteText(ben, id, text);
  await waitUntil(ben, 'the note signed by Ann', (id) =>
    document.querySelector(`[data-note-id="${id}"] [data-testid=note-author]`).textContent === '— Ann', id);
  if (await ben.locator(`[data-note-id="${id}"] textarea`).count() !== 0) {
    throw new Error('Ben may edit the text of a note Ann wrote');
  }
  await waitMember(ben, 'Ann');

  // Ann's pointer shows at Ben's, with her name.
  const board = await ann.getByTestId('board').boundingBox();
  await ann.mouse.move(board.x + 700, board.y + 120, { steps: 5 });
  await waitUntil(ben, "Ann's cursor", () =>
    [...document.querySelectorAll('[data-testid=cursor]')].some((c) => c.textContent === 'Ann'));

  // A drag at Ann's moves the note at Ben's.
  const start = await notePosition(ben, id);
  await dragNote(ann, id, 260, 140);
  const moved = await notePosition(ann, id);
  if (moved.x === start.x && moved.y === start.y) throw new Error('the drag did not move the note at Ann\'s');
  await waitNoteAt(ben, id, moved);

  // Ben writes too (asked his name first), and a note Ann deletes disappears at Ben's.
  const benText = 'Have a wonderful year ahead! <b>Cheers</b>';
  const benNote = await addNote(ben, benText);
  if (!ben.named) throw new Error('Ben was not asked his name before his first note');
  await waitNoteText(ann, benNote, benText);
  await waitMember(ann, 'Ben');
  if (await ann.locator(`[data-note-id="${benNote}"] b`).count() !== 0) throw new Error('note text was rendered as HTML');
  const scrap = await addNote(ann, 'oops, wrong paper');
  await waitNoteText(ben, scrap, 'oops, wrong paper');
  await ann.locator(`[data-note-id="${scrap}"] [data-testid=note-delete]`).click();
  await waitUntil(ben, `note ${scrap} to disappear`, (id) => !document.querySelector(`[data-note-id="${id}"]`), scrap);

  // Everything Ann and Ben wrote is in Redis before the restart.
  for (const page of [ann, ben]) await waitSaved(page);
  await ann.mouse.move(board.x + 900, board.y + 400, { steps: 3 });
  await captureView(ann, shots, '05-free-layout', 'the free layout');
  await captureView(ben, shots, '06-free-layout-other', 'the free layout of another person');

  // The server restarts: both pages say they are offline, then come back alone.
  const exit = await server.stop();
  if (exit.code !== 0) throw new Error(`the server exited with ${JSON.stringify(exit)} after SIGTERM`);
  for (const page of [ann, ben]) {
    await waitUntil(page, 'the offline banner', () => {
      const banner = document.querySelector('[data-testid=offline-banner]');
      return banner !== null && !banner.hidden && banner.offsetHeight > 0
        && document.querySelector('[data-testid=status]').dataset.state === 'offline';
    });
  }
  await server.start();
  for (const page of [ann, ben]) {
    await waitOnline(page, RECONNECT_TIMEOUT_MS);
    await waitUntil(page, 'the offline banner to go', () => document.querySelector('[data-testid=offline-banner]').hidden);
    await waitNoteText(page, id, text);
    await waitNoteText(page, benNote, benText);
    await waitNoteAt(page, id, moved);
    if (await page.locator(`[data-note-id="${scrap}"]`).count() !== 0) throw new Error(`${page.label}: a deleted note came back`);
  }
  await waitMember(ann, 'Ben');
  await waitMember(ben, 'Ann');
  await ann.context().close();
  await ben.context().close();
}

async function coverSetByTheOwner({ browser, problems, shots }) {
  const paper = `e2e-cover-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/?paper=${paper}`, 'Ben');

  await ann.getByTestId('edit-cover').click();
  await captureView(ann, shots, '07-cover-form', 'the cover form');
  await setCover(ann, { title: 'Happy birthday, Kim! 🎉', to: 'Kim', occasion: 'Birthday' });
  for (const page of [ann, ben]) {
    await waitUntil(page, 'the cover', () =>
      document.querySelector('[data-testid=cover-title]').textContent === 'Happy birthday, Kim! 🎉'
      && document.querySelector('[data-testid=cover-to]').textContent === 'For Kim'
      && document.querySelector('[data-testid=cover-occasion]').textContent === 'Birthday');
  }
  await addNote(ann, 'Happy birthday! May the year be as kind to you as you are to us.');
  await addNote(ben, 'Cake on Friday is on me 🍰');
  await addNote(ben, '🎂🎉');
  for (const page of [ann, ben]) await waitSaved(page);

  // A late joiner sees the cover in its snapshot.
  const cat = await openPage(browser, 'Cat', problems);
  await openPaperAs(cat, `${base}/?paper=${paper}`);
  await waitUntil(cat, 'the cover', () => document.querySelector('[data-testid=cover-title]').textContent === 'Happy birthday, Kim! 🎉');

  // The link to share names the paper, not the person.
  await ben.getByTestId('copy-link').click();
  await waitUntil(ben, 'the copied link', () => [...document.querySelectorAll('[data-testid=toast]')].some((t) => t.textContent.includes('?paper=')));
  await blur(ben);
  await captureView(ben, shots, '08-card', 'the card with its cover and notes');
  for (const page of [ann, ben, cat]) await page.context().close();
}

async function typingAndDraggingAtOnceConverge({ browser, problems }) {
  const paper = `e2e-race-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  const annSent = recordSent(ann);
  const benSent = recordSent(ben);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/?paper=${paper}`, 'Ben');
  await useFreeLayout(ann);
  await useFreeLayout(ben);
  const id = await addNote(ann, 'Dear Kim,');
  await waitNoteText(ben, id, 'Dear Kim,');
  await waitSaved(ann);

  // Ben drags Ann's note while she writes: each sends only its fields
  // (`patch`), so both changes survive, and Ann's typing is never undone.
  const more = ' we will miss you at the office. Come back and visit us soon!';
  const start = await notePosition(ben, id);
  const from = annSent.length;
  await Promise.all([ann.keyboard.type(more, { delay: 20 }), dragNote(ben, id, -180, 120)]);
  const typed = await ann.locator(`[data-note-id="${id}"] textarea`).inputValue();
  if (typed !== 'Dear Kim,' + more) throw new Error(`Ann's typing was changed under her: ${JSON.stringify(typed)}`);
  const moved = await notePosition(ben, id);
  if (moved.x === start.x && moved.y === start.y) {
    const sent = benSent.map((m) => `${m.type}(${JSON.stringify(m.data ?? {})})`).join(' ');
    throw new Error(`the drag did not move the note at Ben's; Ben sent: ${sent}`);
  }
  await waitNoteText(ben, id, typed);
  await waitNoteAt(ann, id, moved);
  await waitNoteAt(ben, id, moved);
  const edits = [...annSent.slice(from), ...benSent].filter((m) => m.id === id && m.type !== 'cursor');
  const bad = edits.filter((m) => m.type === 'upsert' && m !== annSent.find((x) => x.id === id));
  if (bad.length || !edits.some((m) => m.type === 'patch' && 'x' in m.data) || !edits.some((m) => m.type === 'patch' && 'text' in m.data)) {
    const summary = edits.map((m) => `${m.type}(${Object.keys(m.data ?? {}).join(',')})`).join(' ');
    throw new Error(`the edits were not field patches of text and position: ${summary}`);
  }
  await ann.context().close();
  await ben.context().close();
}

async function signaturesOutliveTheirAuthors({ browser, problems }) {
  const paper = `e2e-sign-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/?paper=${paper}`, 'Ben');
  // Someone who has not given a name is never shown under a made-up one.
  await waitUntil(ben, 'Ann listed, without a made-up name', () => {
    const names = [...document.querySelectorAll('[data-testid=member-name]')].map((m) => m.textContent);
    return names.length === 2 && names.includes('Someone') && !names.some((n) => /Guest|u-/.test(n));
  });
  const id = await addNote(ann, 'Good luck in Lisbon!');
  await waitNoteText(ben, id, 'Good luck in Lisbon!');
  await waitSaved(ann);

  // The name is remembered on Ann's device: after a reload, no question, same
  // signature; this time she writes with the keyboard alone.
  await ann.reload();
  await waitOnline(ann);
  const before = await noteIds(ann);
  await ann.getByTestId('add-note').focus();
  await ann.keyboard.press('Enter');
  const again = await focusNewNote(ann, before);
  await ann.keyboard.type('And bring back pastéis de nata.');
  const signed = (id) => document.querySelector(`[data-note-id="${id}"] [data-testid=note-author]`)?.textContent === '— Ann';
  await waitUntil(ben, 'the second note signed by Ann', signed, again);
  if (await ann.evaluate(() => localStorage.getItem('rp.name')) !== 'Ann') throw new Error('the name is not remembered on the device');
  await waitSaved(ann);

  await ann.context().close();
  await waitUntil(ben, 'Ann to leave', () =>
    ![...document.querySelectorAll('[data-testid=member-name]')].some((m) => m.textContent === 'Ann'));
  await waitUntil(ben, 'the signature after Ann left', signed, id);
  const cat = await openPage(browser, 'Cat', problems);
  await openPaperAs(cat, `${base}/?paper=${paper}`);
  await waitUntil(cat, 'the signature for a later joiner', signed, id);
  await ben.context().close();
  await cat.context().close();
}

async function completingSealsThePaper({ browser, problems, shots }) {
  const paper = `e2e-done-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/#${paper}`, 'Ben');
  await setCover(ben, { title: 'Congratulations, Sam!', to: 'Sam', occasion: 'New job' });
  const id = await addNote(ann, 'Congratulations on the new job!');
  await addNote(ben, 'So proud of you 🥳');
  await waitNoteText(ben, id, 'Congratulations on the new job!');

  await ben.getByTestId('complete').click();
  const preview = new URL(await ben.getByTestId('keepsake-preview').getAttribute('href'));
  if (preview.searchParams.get('paper') !== paper || preview.searchParams.get('view') !== 'keepsake') {
    throw new Error(`the preview before sealing links to ${preview}`);
  }
  await captureView(ben, shots, '09-seal-confirm', 'the question before sealing');
  await ben.getByTestId('complete-yes').click();
  for (const page of [ann, ben]) {
    await waitUntil(page, 'the final card', () => {
      const banner = document.querySelector('[data-testid=completed-banner]');
      const stamp = document.querySelector('[data-testid=sealed-stamp]');
      const keepsake = document.querySelector('[data-testid=keepsake-link]');
      return banner !== null && !banner.hidden && /sealed/.test(banner.textContent)
        && document.querySelector('[data-testid=final-card]') !== null && stamp.offsetHeight > 0
        && document.querySelectorAll('[data-testid=note]').length === 2
        && keepsake.offsetHeight > 0 && new URL(keepsake.href).searchParams.get('view') === 'keepsake';
    });
  }
  const editable = await ann.evaluate((id) => ({
    text: !document.querySelector(`[data-note-id="${id}"] textarea`).readOnly,
    add: document.querySelector('[data-testid=add-note]').offsetHeight > 0,
  }), id);
  if (editable.text || editable.add) throw new Error(`a completed paper is still editable: ${JSON.stringify(editable)}`);

  // A refusal is shown to the person: an edit forced past the controls.
  await ann.evaluate((id) => window.rollingpaper.client.sendRaw({ type: 'upsert', id, data: { text: 'late' }, ref: 'late' }), id);
  await waitUntil(ann, 'the paper_completed refusal to show', () =>
    [...document.querySelectorAll('[data-testid=toast]')].some((t) => t.textContent.includes('paper_completed')));
  await waitNoteText(ben, id, 'Congratulations on the new job!');
  await blur(ben);
  await captureView(ben, shots, '10-final-card', 'the final card');
  await ann.context().close();
  await ben.context().close();
}

async function onAPhone({ browser, problems, shots }) {
  const paper = `e2e-phone-${Date.now().toString(36)}`;
  const kim = await openPage(browser, 'Kim', problems, { viewport: PHONE, isMobile: true, hasTouch: true });
  await openPaperAs(kim, `${base}/?paper=${paper}`, 'Kim');
  await setCover(kim, { title: 'Farewell, Sam', to: 'Sam', occasion: 'Farewell' });
  await addNote(kim, 'We will miss you, Sam! Send us pictures from the mountains 🏔️');
  await addNote(kim, 'Thank you for all the help.');
  await waitSaved(kim);

  // Someone opening the link on a phone sees the cover and the first note at once.
  const lee = await openPage(browser, 'Lee', problems, { viewport: PHONE, isMobile: true, hasTouch: true });
  await openPaperAs(lee, `${base}/?paper=${paper}`, 'Lee');
  await waitUntil(lee, 'the notes', () => document.querySelectorAll('[data-testid=note]').length === 2);
  const layout = await lee.evaluate(() => {
    const box = (sel) => document.querySelector(sel).getBoundingClientRect();
    const notes = [...document.querySelectorAll('[data-testid=note]')].map((n) => n.getBoundingClientRect());
    return {
      scrollY: window.scrollY,
      scroll: document.documentElement.scrollWidth,
      top: box('.top').height,
      cover: box('[data-testid=cover]'),
      firstNoteTop: Math.min(...notes.map((n) => n.top)),
      widest: Math.max(...notes.map((n) => n.right), box('[data-testid=add-note]').right),
      count: document.querySelector('[data-testid=people-count]').textContent,
    };
  });
  if (layout.scroll > 390 || layout.widest > 390) throw new Error(`the card is wider than the phone: ${JSON.stringify(layout)}`);
  if (layout.scrollY !== 0 || layout.cover.top < 0 || layout.cover.bottom > layout.firstNoteTop) {
    throw new Error(`the cover is not shown whole above the notes: ${JSON.stringify(layout)}`);
  }
  if (layout.firstNoteTop > 0.6 * 844) throw new Error(`the first note starts at ${layout.firstNoteTop} px, below 60% of the screen`);
  if (layout.top > 64) throw new Error(`the top bar takes ${layout.top} px on a phone`);
  if (layout.count !== '2') throw new Error(`the people count reads ${layout.count}, not 2`);
  await captureView(lee, shots, '11-phone-card', 'the card opened on a phone');
  await kim.context().close();
  await lee.context().close();
}

/**
 * A card twelve people have open: one page, and eleven sessions opened from
 * another page of the server (names of all lengths).
 */
async function twelvePeopleAndNothingWraps({ browser, problems, shots }) {
  const paper = `e2e-twelve-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await setCover(ann, { title: 'Welcome to the team, Priya!', to: 'Priya', occasion: 'Welcome' });
  await addNote(ann, 'So glad you are here!');
  const crowd = await openPage(browser, 'Crowd', problems);
  await crowd.goto(`${base}/healthz`);
  const names = ['Bo', 'Chidinma Okonkwo-Adebayo', 'Dmitri', 'Élodie', '김민지', 'Farah', 'Gustavo Henrique dos Santos', 'Hana', 'Ivo', 'Jun', 'Kalani'];
  await crowd.evaluate(([paper, names]) => new Promise((resolve, reject) => {
    let joined = 0;
    window.sockets = names.map((name, i) => {
      const ws = new WebSocket(`ws://${location.host}/ws/${paper}?user=crowd-${i}&name=${encodeURIComponent(name)}`);
      ws.onmessage = (event) => { if (JSON.parse(event.data).type === 'snapshot' && ++joined === names.length) resolve(); };
      ws.onerror = () => reject(new Error(`socket ${i} failed`));
      return ws;
    });
  }), [paper, names]);
  await waitUntil(ann, 'twelve people here', () => document.querySelector('[data-testid=people-count]').textContent === '12');

  // No control wraps or leaves its row, at either size.
  for (const size of [DESKTOP, PHONE]) {
    await ann.setViewportSize(size);
    const wrapped = await ann.evaluate(() => {
      const problems = [];
      for (const row of document.querySelectorAll('.topbar, .toolbar')) {
        const items = [...row.children].filter((c) => c.getClientRects().length > 0 && c.offsetWidth > 0);
        const centres = items.map((c) => { const r = c.getBoundingClientRect(); return r.top + r.height / 2; });
        if (Math.max(...centres) - Math.min(...centres) > 2) problems.push(`${row.className}: items on more than one line`);
        if (row.getBoundingClientRect().right > window.innerWidth) problems.push(`${row.className}: wider than the window`);
      }
      for (const control of document.querySelectorAll('.topbar button, .toolbar button')) {
        if (control.getClientRects().length === 0) continue;
        const r = control.getBoundingClientRect();
        if (r.height > 48 || control.scrollWidth > control.clientWidth + 1) problems.push(`"${control.textContent.trim()}" wraps (${r.width}x${r.height})`);
      }
      if (document.querySelector('.top').getBoundingClientRect().height > 64) problems.push('the top bar is more than one row');
      return problems;
    });
    if (wrapped.length) throw new Error(`at ${size.width}x${size.height} with 12 people: ${wrapped.join('; ')}`);
  }
  await ann.setViewportSize(DESKTOP);

  // The list is there on demand, by keyboard too.
  await ann.getByTestId('people-button').focus();
  await ann.keyboard.press('Enter');
  await waitUntil(ann, 'the list of people', () => !document.querySelector('[data-testid=people-panel]').hidden
    && document.querySelectorAll('[data-testid=people-panel] [data-testid=member]').length === 12
    && document.querySelector('[data-testid=people-button]').getAttribute('aria-expanded') === 'true');
  for (const size of [DESKTOP, PHONE]) {
    await ann.setViewportSize(size);
    const panel = await ann.getByTestId('people-panel').boundingBox();
    if (panel.x < 0 || panel.x + panel.width > size.width || panel.y + panel.height > size.height) {
      throw new Error(`the list of people leaves the ${size.width}x${size.height} window: ${JSON.stringify(panel)}`);
    }
  }
  await ann.setViewportSize(DESKTOP);
  const listed = await ann.locator('[data-testid=member-name]').allTextContents();
  for (const name of ['Ann (you)', ...names]) if (!listed.includes(name)) throw new Error(`${name} is not in the list: ${listed.join(', ')}`);
  await captureView(ann, shots, '12-twelve-people', 'the list of twelve people');
  await ann.keyboard.press('Escape');
  await waitUntil(ann, 'the list to close', () => document.querySelector('[data-testid=people-panel]').hidden
    && document.activeElement?.dataset.testid === 'people-button');
  await crowd.evaluate(() => window.sockets.forEach((ws) => ws.close()));
  await crowd.context().close();
  await ann.context().close();
}

async function koreanRendersWithRealGlyphs({ browser, problems, shots }) {
  const paper = `e2e-korean-${Date.now().toString(36)}`;
  const minji = await openPage(browser, 'Minji', problems);
  const ann = await openPage(browser, 'Ann', problems);
  await openPaperAs(minji, `${base}/?paper=${paper}`, '김민지');
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await setCover(minji, { title: '생일 축하해요, 지수 씨!', to: '지수', occasion: '생일' });
  const korean = '지수 씨, 생일 진심으로 축하해요! 늘 웃게 해줘서 고마워요. 🎂';
  const id = await addNote(minji, korean);
  await addNote(minji, 'お誕生日おめでとう！ 生日快乐！');
  await addNote(ann, 'Happy birthday, Jisu! 🎉');
  await waitNoteText(ann, id, korean);
  await waitSaved(minji);

  // The text is drawn with a font that has Hangul, not the empty boxes of a
  // missing glyph. (document.fonts.check also answers true for a font that is
  // not installed, so the fonts Chromium actually used are asked over CDP.)
  const face = await ann.evaluate(() => document.fonts.check('16px "Noto Sans CJK KR"', '생일'));
  if (!face) throw new Error('document.fonts.check does not find "Noto Sans CJK KR" for Hangul');
  const cdp = await ann.context().newCDPSession(ann);
  await cdp.send('DOM.enable');
  await cdp.send('CSS.enable');
  const { root } = await cdp.send('DOM.getDocument', { depth: -1 });
  for (const selector of [`[data-note-id="${id}"] [data-testid=note-text]`, '[data-testid=cover-title]', `[data-note-id="${id}"] [data-testid=note-author]`]) {
    const { nodeId } = await cdp.send('DOM.querySelector', { nodeId: root.nodeId, selector });
    const { fonts } = await cdp.send('CSS.getPlatformFontsForNode', { nodeId });
    const cjk = fonts.filter((f) => /CJK|Gothic|Hangul|Nanum|Malgun|Apple SD/i.test(f.familyName) && f.glyphCount > 0);
    if (!cjk.length) throw new Error(`${selector} is drawn with ${JSON.stringify(fonts)}: no font with Hangul`);
  }
  await cdp.detach();
  // Distinct syllables are distinct glyphs in the page's font (missing ones would all be the same box).
  const distinct = await ann.evaluate(() => {
    const font = getComputedStyle(document.querySelector('[data-testid=note-text]')).fontFamily;
    const draw = (text) => {
      const canvas = document.createElement('canvas');
      canvas.width = 64; canvas.height = 64;
      const ctx = canvas.getContext('2d');
      ctx.font = `48px ${font}`;
      ctx.fillText(text, 4, 52);
      return Array.from(ctx.getImageData(0, 0, 64, 64).data.filter((_, i) => i % 4 === 3)).join(',');
    };
    const [a, b, missing] = [draw('생'), draw('일'), draw('\u0378')];
    return a !== b && a !== missing && b !== missing && /[1-9]/.test(a);
  });
  if (!distinct) throw new Error('Hangul syllables are drawn as the same glyph: no Korean font');
  await blur(minji);
  await blur(ann);
  await captureView(ann, shots, '13-korean', 'a card written in Korean');
  await minji.context().close();
  await ann.context().close();
}

async function offlineWritingIsSentOnReconnect({ browser, server, problems, shots }) {
  const paper = `e2e-offline-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/?paper=${paper}`, 'Ben');
  await setCover(ann, { title: 'Get well soon, Rui', to: 'Rui', occasion: 'Get well' });
  const first = await addNote(ann, 'Thinking of you!');
  await waitNoteText(ben, first, 'Thinking of you!');
  await waitSaved(ann);

  const exit = await server.stop();
  if (exit.code !== 0) throw new Error(`the server exited with ${JSON.stringify(exit)} after SIGTERM`);
  await waitUntil(ann, 'offline', () => document.querySelector('[data-testid=status]').dataset.state === 'offline'
    && !document.querySelector('[data-testid=offline-banner]').hidden);

  // Offline, Ann keeps writing: a new note, more text and a new colour on her first.
  if (await ann.getByTestId('add-note').isDisabled()) throw new Error('"Write a note" is disabled offline');
  const late = await addNote(ann, 'Written on the train, offline.');
  await ann.locator(`[data-note-id="${first}"] textarea`).focus();
  await ann.keyboard.press('End');
  await ann.keyboard.type(' Get well soon!', { delay: 10 });
  await ann.locator(`[data-note-id="${first}"] [data-testid=note-colour]`).click();
  await ann.locator(`[data-note-id="${first}"] [data-testid=colour-green]`).click();
  await blur(ann);
  await waitUntil(ann, 'both notes shown as waiting to be sent', ([a, b]) => [a, b].every((id) => {
    const note = document.querySelector(`[data-note-id="${id}"]`);
    const tag = note.querySelector('[data-testid=note-pending]');
    return !tag.hidden && tag.offsetHeight > 0 && !note.querySelector('textarea').readOnly;
  }) && /sent when the connection is back/.test(document.querySelector('[data-testid=offline-banner]').textContent), [first, late]);
  await captureView(ann, shots, '14-offline-writing', 'writing offline');

  // Back online (Ann presses "Retry now"): everything goes, and Ben sees it.
  await server.start();
  await ann.locator('#retry-now').click().catch(() => { /* already reconnecting */ });
  await waitOnline(ann, RECONNECT_TIMEOUT_MS);
  await waitOnline(ben, RECONNECT_TIMEOUT_MS);
  await waitNoteText(ben, late, 'Written on the train, offline.', RECONNECT_TIMEOUT_MS);
  await waitNoteText(ben, first, 'Thinking of you! Get well soon!');
  await waitUntil(ben, 'the new colour', (id) => document.querySelector(`[data-note-id="${id}"]`).dataset.colour === '#d7f5d0', first);
  await waitSaved(ann);
  await waitUntil(ann, 'nothing waiting any more', () =>
    [...document.querySelectorAll('[data-testid=note-pending]')].every((t) => t.hidden));
  const stored = await (await fetch(`${base}/papers/${paper}`)).json();
  const texts = stored.notes.map((n) => n.data.text);
  if (!texts.includes('Written on the train, offline.') || !texts.includes('Thinking of you! Get well soon!')) {
    throw new Error(`the server does not hold the offline edits: ${JSON.stringify(texts)}`);
  }
  await ann.context().close();
  await ben.context().close();
}

async function freeLayoutPlacesAndKeepsNotes({ browser, problems, shots }) {
  const paper = `e2e-free-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  const annSent = recordSent(ann);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/?paper=${paper}`, 'Ben');
  await setCover(ann, { title: 'Happy retirement, Jo!', to: 'Jo', occasion: 'Retirement' });
  await useFreeLayout(ann);
  await useFreeLayout(ben);

  // New notes land in free space: none covers another.
  const ids = [];
  for (const text of ['Enjoy every morning!', 'Thank you for 30 years.', '🎉🥂', 'Come and see us.', 'The garden awaits 🌻', 'Bon voyage!', 'We owe you a cake.']) {
    ids.push(await addNote(ann, text, { fast: true }));
  }
  await addNote(ben, 'Enjoy it, Jo!', { fast: true });
  await blur(ben);
  await waitUntil(ann, 'eight notes', () => document.querySelectorAll('[data-testid=note]').length === 8);
  await blur(ann);
  let boxes = await noteBoxes(ann);
  if (overlapping(boxes).length) throw new Error(`new notes overlap: ${overlapping(boxes).join(', ')}`);

  // A long note keeps its size: it neither grows over the note below nor changes the others.
  const sizes = Object.fromEntries(boxes.map((b) => [b.id, `${b.width}x${b.height}`]));
  await ann.locator(`[data-note-id="${ids[0]}"] textarea`).focus();
  await ann.keyboard.press('End');
  await ann.keyboard.insertText(' You taught us how to read a balance sheet, how to keep a meeting short, and how to laugh at a deadline. '.repeat(4));
  await blur(ann);
  await waitUntil(ben, 'the long note', (id) => document.querySelector(`[data-note-id="${id}"] [data-testid=note-text]`).textContent.length > 300, ids[0]);
  for (const page of [ann, ben]) {
    boxes = await noteBoxes(page);
    if (overlapping(boxes).length) throw new Error(`${page.label}: a long note overlaps: ${overlapping(boxes).join(', ')}`);
    for (const b of boxes) {
      if (b.id !== ids[0] && sizes[b.id] && sizes[b.id] !== `${b.width}x${b.height}`) throw new Error(`${page.label}: note ${b.id} changed size`);
    }
  }

  // Tilted, each, as notes pinned by hand (straight only while being written in).
  const flat = await ben.evaluate(() => [...document.querySelectorAll('[data-testid=note]')]
    .filter((n) => ['none', 'matrix(1, 0, 0, 1, 0, 0)'].includes(getComputedStyle(n).transform)).length);
  if (flat) throw new Error(`${flat} note(s) are not tilted`);

  // A note's colour changes after it was written (a patch of `color`), for
  // everyone; by keyboard: the colour button, arrows to a colour, Enter.
  await ann.locator(`[data-note-id="${ids[1]}"] [data-testid=note-colour]`).focus();
  await ann.keyboard.press('Enter');
  await waitUntil(ann, 'the palette', () => document.activeElement?.closest('[data-testid=note-palette]') != null);
  await captureView(ann, shots, '15-colour-palette', 'a note\'s colour palette');
  for (let steps = 0; await ann.evaluate(() => document.activeElement?.dataset.testid) !== 'colour-blue'; steps++) {
    if (steps === 6) throw new Error('the arrow keys do not reach the colour Blue in the palette');
    await ann.keyboard.press('ArrowRight');
  }
  await ann.keyboard.press('Enter');
  await waitUntil(ann, 'the palette to close, focus back on its button', () =>
    !document.querySelector('[data-testid=note-palette]') && document.activeElement?.dataset.testid === 'note-colour');
  await waitUntil(ben, 'the note turned blue', (id) =>
    getComputedStyle(document.querySelector(`[data-note-id="${id}"]`)).backgroundColor === 'rgb(205, 239, 253)', ids[1]);
  // Sent as a patch, never the whole note again: its text is not in it (the
  // client may merge a layout field patched in the same 50 ms into it).
  const notes = annSent.filter((m) => m.id === ids[1] && (m.type === 'patch' || m.type === 'upsert'));
  const colour = notes.find((m) => m.type === 'patch' && m.data.color === '#cdeffd');
  const sentAgain = notes.filter((m) => m.type === 'upsert').length > 1;
  if (!colour || 'text' in colour.data || sentAgain) {
    throw new Error(`the colour was not sent as a patch of the note's fields: ${JSON.stringify(notes)}`);
  }

  // An emoji-only note is written large.
  const size = (id) => ben.evaluate((id) => parseFloat(getComputedStyle(document.querySelector(`[data-note-id="${id}"] [data-testid=note-text]`)).fontSize), id);
  const [emoji, text] = [await size(ids[2]), await size(ids[3])];
  if (!(emoji >= 2.5 * text)) throw new Error(`an emoji-only note is written at ${emoji} px, text at ${text} px`);
  await waitSaved(ann);
  await blur(ann);
  await captureView(ben, shots, '16-free-layout-notes', 'the free layout with many notes');
  await ann.context().close();
  await ben.context().close();
}

async function keepsakeForTheRecipient({ browser, problems, shots }) {
  const paper = `e2e-keepsake-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  await openPaperAs(ann, `${base}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${base}/?paper=${paper}`, 'Ben');
  const cover = { title: 'Happy birthday, Kim!', to: 'Kim', occasion: 'Birthday' };
  await setCover(ann, cover);
  const written = [
    [ann, 'Happy birthday, Kim! Thank you for every Friday cake.'],
    [ben, 'Have a wonderful year ahead, full of good books and long walks.'],
    [ann, '🎂🎉'],
    [ben, '생일 축하해요! 늘 고마워요.'],
    [ann, 'To the best desk neighbour anyone could ask for: may your coffee always be hot and your meetings short.'],
    [ben, 'Cheers to you!'],
    [ann, 'You make Mondays bearable. That is a superpower.'],
    [ben, 'Remember the offsite in the rain? Best day of the year. Happy birthday!'],
    [ann, 'Wishing you sunshine, cake and a very long weekend.'],
    [ben, 'Thank you for always having the right answer (and the right snack).'],
    [ann, 'Another year wiser. Still the funniest person in the room.'],
    [ben, 'All the best, from the whole team on the third floor.'],
  ];
  for (const [page, text] of written) await addNote(page, text, { fast: true });
  for (const page of [ann, ben]) await waitSaved(page);
  await ann.getByTestId('complete').click();
  await ann.getByTestId('complete-yes').click();
  await waitUntil(ann, 'the keepsake link', () => document.querySelector('[data-testid=keepsake-link]').offsetHeight > 0);
  const link = await ann.getByTestId('keepsake-link').getAttribute('href');

  // Kim opens the keepsake: the cover, then every note, nothing to edit.
  const kim = await openPage(browser, 'Kim', problems);
  await kim.goto(link);
  await waitUntil(kim, 'the keepsake', (count) => document.querySelectorAll('[data-testid=note]').length === count
    && document.querySelector('[data-testid=cover-title]').textContent === 'Happy birthday, Kim!', written.length);
  const view = await kim.evaluate(() => {
    const shown = (e) => e.getClientRects().length > 0;
    const cover = document.querySelector('[data-testid=cover]').getBoundingClientRect();
    const notes = [...document.querySelectorAll('[data-testid=note]')].map((n) => n.getBoundingClientRect().top);
    return {
      controls: [...document.querySelectorAll('button, input, textarea, select')].filter(shown).map((e) => e.dataset.testid || e.id),
      coverFirst: cover.bottom <= Math.min(...notes),
      from: document.querySelector('[data-testid=cover-from]').textContent,
      top: shown(document.querySelector('.top')),
    };
  });
  if (view.controls.join() !== 'print') throw new Error(`the keepsake shows controls: ${view.controls.join(', ')}`);
  if (!view.coverFirst || view.top) throw new Error(`the keepsake is not the cover then the notes: ${JSON.stringify(view)}`);
  if (view.from !== 'With love from Ann and Ben') throw new Error(`the keepsake's cover says ${JSON.stringify(view.from)}`);
  await captureView(kim, shots, '17-keepsake', 'the keepsake');

  // "Save as PDF": pages that poppler renders, the cover and every note in them.
  const pdf = join(config.screenshots, 'keepsake.pdf');
  await kim.pdf({ path: pdf, format: 'A4', printBackground: true });
  const prefix = join(config.screenshots, '18-keepsake-pdf');
  await run('pdftoppm', ['-r', '60', '-png', pdf, prefix]);
  const pages = readdirSync(config.screenshots).filter((f) => f.startsWith('18-keepsake-pdf') && f.endsWith('.png')).sort();
  if (pages.length < 2) throw new Error(`the keepsake printed on ${pages.length} page(s)`);
  for (const page of pages) {
    const png = readFileSync(join(config.screenshots, page));
    const [width, height] = [png.readUInt32BE(16), png.readUInt32BE(20)];
    // A4 at 60 dpi: 496 x 702.
    if (Math.abs(width - 496) > 2 || Math.abs(height - 702) > 2) throw new Error(`${page} is ${width}x${height}, not an A4 page`);
    shots.push(join(config.screenshots, page));
  }
  const squash = (s) => s.replace(/\s+/g, '');
  const firstPage = squash(await run('pdftotext', ['-f', '1', '-l', '1', '-raw', pdf, '-']));
  if (!firstPage.includes(squash(cover.title)) || !firstPage.includes('ForKim')) throw new Error(`the first page is not the cover: ${firstPage}`);
  const text = squash(await run('pdftotext', ['-raw', pdf, '-']));
  const missing = written.map(([, t]) => t).filter((t) => !text.includes(squash(t)));
  if (missing.length) throw new Error(`the PDF lacks notes: ${missing.join(' | ')}`);
  if (text.includes('SaveasPDF')) throw new Error('the PDF shows the "Save as PDF" button');
  await ann.context().close();
  await ben.context().close();
  await kim.context().close();
}

/** Waits for a page of its own: `title` focused, no card, no control to use, no offline notice. */
async function waitEnded(page, title) {
  await waitUntil(page, `the end state "${title}"`, (title) => {
    const view = document.querySelector('[data-testid=ended]');
    const heading = document.querySelector('[data-testid=ended-title]');
    const shown = (e) => e.getClientRects().length > 0;
    return view !== null && shown(view) && heading.textContent === title && document.activeElement === heading
      && !shown(document.getElementById('card')) && !shown(document.querySelector('[data-testid=status]'))
      && !shown(document.querySelector('[data-testid=offline-banner]'))
      && ![...document.querySelectorAll('button, input, textarea, select')].some(shown);
  }, title);
}

async function notAuthorisedIsNotOffline({ browser, problems, shots, authServer }) {
  const paper = `e2e-auth-${Date.now().toString(36)}`;
  const authBase = `http://127.0.0.1:${authServer.port}`;
  const eve = await openPage(browser, 'Eve', problems, {}, authBase);
  let sockets = 0;
  eve.on('websocket', () => { sockets += 1; });
  await eve.goto(`${authBase}/?paper=${paper}`);
  await waitEnded(eve, 'You are not authorised to open this card.');
  const status = await eve.evaluate(() => ({
    client: window.rollingpaper.client.state.status,
    shown: document.querySelector('[data-testid=status]').dataset.connection,
    text: document.querySelector('[data-testid=ended-text]').textContent,
  }));
  if (status.client !== 'unauthorised' || status.shown !== 'unauthorised' || !/Ask the person who sent it/.test(status.text)) {
    throw new Error(`not shown as "not authorised": ${JSON.stringify(status)}`);
  }
  const opened = sockets;
  await captureView(eve, shots, '19-not-authorised', 'the "not authorised" page');
  if (sockets !== opened) throw new Error('the page tried again after "not authorised"');
  await eve.context().close();
}

/** An HS256 token as the main backend issues them (PROTOCOL.md 5). */
function jwt(claims) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ exp: Math.floor(Date.now() / 1000) + 600, ...claims })}`;
  return `${head}.${createHmac('sha256', JWT_SECRET).update(head).digest('base64url')}`;
}

async function aTokensNameSignsNotes({ browser, problems, authServer }) {
  const paper = `e2e-token-${Date.now().toString(36)}`;
  const authBase = `http://127.0.0.1:${authServer.port}`;
  const dana = await openPage(browser, 'Dana', problems, {}, authBase);
  const token = jwt({ sub: 'dana-17', paper, role: 'owner', name: 'Dana' });
  // No personName: a name prompt would fail the test.
  await dana.goto(`${authBase}/?paper=${paper}&token=${token}`);
  await waitOnline(dana);
  const id = await addNote(dana, 'Welcome aboard!');
  await waitUntil(dana, 'the note signed with the token\'s name', (id) =>
    document.querySelector(`[data-note-id="${id}"] [data-testid=note-author]`).textContent === '— Dana', id);
  await waitMember(dana, 'Dana (you)');
  await dana.getByTestId('copy-link').click();
  await waitUntil(dana, 'the link copied', () => document.querySelector('[data-testid=copy-link]').dataset.link);
  const link = new URL(await dana.getByTestId('copy-link').getAttribute('data-link'));
  if (link.searchParams.has('token') || link.searchParams.get('paper') !== paper) throw new Error(`the link to share is ${link}`);
  await dana.context().close();
}

async function cardsThatCannotBeShown({ browser, problems, shots }) {
  const page = await openPage(browser, 'Kim', problems);
  // A link that names no card.
  await page.goto(`${base}/?paper=${encodeURIComponent('not a card!')}`);
  await waitEnded(page, 'This link does not lead to a card.');
  await captureView(page, shots, '20-not-a-card', 'the page of a link to no card');
  // The keepsake of a card nobody wrote on yet.
  await page.goto(`${base}/?paper=e2e-unwritten-${Date.now().toString(36)}&view=keepsake`);
  await waitEnded(page, 'This card is still being written.');
  await captureView(page, shots, '21-keepsake-not-yet', 'the keepsake of a card nobody wrote on');
  await page.context().close();
}

async function theBackendEndsTheCard({ browser, problems, shots }) {
  const api = await runningApiServer();
  const apiBase = `http://127.0.0.1:${api.port}`;
  const paper = `e2e-end-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems, {}, apiBase);
  const ben = await openPage(browser, 'Ben', problems, {}, apiBase);
  let annSockets = 0;
  ann.on('websocket', () => { annSockets += 1; });
  await openPaperAs(ann, `${apiBase}/?paper=${paper}`, 'Ann');
  await openPaperAs(ben, `${apiBase}/?paper=${paper}`, 'Ben');
  const id = await addNote(ann, 'See you on Friday!');
  await waitNoteText(ben, id, 'See you on Friday!');
  await waitSaved(ann);
  await waitMember(ben, 'Ann');

  // The main backend removes Ann's access: her page ends, Ben's stays.
  const user = await ann.evaluate(() => window.rollingpaper.client.state.user);
  const opened = annSockets;
  const revoked = await backendApi(api, 'POST', `/api/papers/${paper}/revoke`, { user });
  if (revoked.status !== 204) throw new Error(`revoke answered ${revoked.status} ${revoked.text}`);
  await waitEnded(ann, 'Your access to this card was removed.');
  await waitUntil(ben, 'Ann to leave', () =>
    ![...document.querySelectorAll('[data-testid=member-name]')].some((m) => m.textContent === 'Ann'));
  await waitOnline(ben);
  await captureView(ann, shots, '22-access-removed', 'the "access removed" page');

  // The main backend erases the card: Ben's page ends too.
  const erased = await backendApi(api, 'DELETE', `/api/papers/${paper}`);
  if (erased.status !== 204) throw new Error(`erase answered ${erased.status} ${erased.text}`);
  await waitEnded(ben, 'This card was deleted.');
  await captureView(ben, shots, '23-card-deleted', 'the "card deleted" page');
  if (annSockets !== opened) throw new Error(`Ann's page opened ${annSockets - opened} WebSocket(s) after her access was removed`);
  const status = await ann.evaluate(() => window.rollingpaper.client.state.status);
  if (status !== 'revoked') throw new Error(`Ann's client is ${status}, not revoked`);
  await ann.context().close();
  await ben.context().close();
}

/**
 * The repository's examples/ over HTTP on a port of their own, as
 * examples/browser.html says to open it (a page the server under test does
 * not serve: another origin, which imports /client.js from the server).
 */
async function serveExamples() {
  const root = fileURLToPath(new URL('../../', import.meta.url));
  const types = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8' };
  const files = createHttpServer((req, res) => {
    const path = new URL(req.url, 'http://localhost').pathname;
    if (!/^\/examples\/[\w.-]+$/.test(path) || !types[extname(path)]) return res.writeHead(404).end();
    readFile(join(root, path)).then(
      (body) => res.writeHead(200, { 'Content-Type': types[extname(path)], 'Cache-Control': 'no-store' }).end(body),
      () => res.writeHead(404).end(),
    );
  });
  await new Promise((resolve, reject) => files.listen(0, '127.0.0.1', resolve).once('error', reject));
  return files;
}

async function theBrowserExampleWorks({ browser, problems }) {
  const files = await serveExamples();
  try {
    const origin = `http://127.0.0.1:${files.address().port}`;
    const paper = `e2e-example-${Date.now().toString(36)}`;
    const text = 'Hello from the browser example';
    const page = await openPage(browser, 'Example', problems, {}, [origin, base]);
    await page.goto(`${origin}/examples/browser.html?server=${encodeURIComponent(base)}&paper=${paper}`);
    await waitUntil(page, 'the example online', () => document.querySelector('[data-testid=status]').value === 'online');
    await page.getByTestId('text').fill(text);
    await page.getByTestId('add').click();
    await waitUntil(page, 'the note saved', (text) => [...document.querySelectorAll('[data-testid=note]')]
      .some((n) => n.dataset.state === 'saved' && n.textContent.includes(text)), text);
    const stored = await (await fetch(`${base}/papers/${paper}`)).json();
    if (!stored.notes.some((n) => n.data.text === text)) throw new Error(`the server does not hold the note: ${JSON.stringify(stored)}`);
    await page.context().close();
  } finally {
    files.closeAllConnections();
    await new Promise((resolve) => files.close(resolve));
  }
}

// ---- Runner ------------------------------------------------------------------------

/** What every page looked like when a scenario failed; then closes them for the next one. */
async function screenshotFailure(shots) {
  for (const page of [...openPages]) {
    shots.push(await screenshot(page, `failed-${page.label.toLowerCase()}`).catch(() => `(no screenshot of ${page.label})`));
    await page.context().close().catch(() => {});
  }
}

const server = new Server();
// Auth on, for the "not authorised" case: no Redis needed.
const authServer = new Server({
  port: Number(env('RP_AUTH_PORT')), name: 'auth-server', args: ['--store', 'memory', '--jwt-secret', JWT_SECRET],
});
// 1.2's backend API on: started by the scenario that needs it.
let apiServer = null;
let browser;
// Set once the run is being cut short; what fails after that is its echo, not news.
let aborting = false;

async function runningApiServer() {
  apiServer ??= new Server({
    port: await freePort(), name: 'api-server', args: ['--store', 'redis', '--redis', config.redis, '--api-key', API_KEY],
  });
  if (!apiServer.child) {
    try {
      await apiServer.start();
    } catch (err) {
      const log = readFileSync(join(config.work, 'api-server.log'), 'utf8').trimEnd().split('\n').slice(-5);
      throw new Error(`${err.message}\n  api-server.log: ${log.join('\n  ')}`);
    }
  }
  return apiServer;
}

/** The first lines of an error: Playwright appends the browser's whole log. */
function summary(err) {
  return err.message.split('\n').slice(0, 8).join('\n  ');
}

async function main() {
  mkdirSync(config.screenshots, { recursive: true });
  const problems = [];
  const shots = [];
  let passed = 0;
  let failed = 0;
  try {
    await Promise.all([server.start(), authServer.start()]);
    // Signals are this script's to handle (abort below), not Playwright's.
    browser = await chromium.launch({
      executablePath: config.chromium, headless: true, args: CHROMIUM_ARGS,
      handleSIGINT: false, handleSIGTERM: false, handleSIGHUP: false,
    });
    const scenarios = [
      ['someone starts a card; two people write, drag and delete together, and survive a server restart', twoPeopleWriteTogether],
      ['the owner sets the cover, the others see it', coverSetByTheOwner],
      ['typing and dragging one note at once keep both (patch)', typingAndDraggingAtOnceConverge],
      ['names are asked once and remembered; signatures outlive their authors', signaturesOutliveTheirAuthors],
      ['sealing shows the final card to everyone, with a keepsake link', completingSealsThePaper],
      ['the card on a phone (390x844): the cover and the first note without scrolling', onAPhone],
      ['twelve people: a count with the list on demand, nothing wraps at 1280 px or on a phone', twelvePeopleAndNothingWraps],
      ['Korean (and Japanese, Chinese) notes render with real glyphs', koreanRendersWithRealGlyphs],
      ['notes written and edited offline show as waiting, and are sent on reconnection', offlineWritingIsSentOnReconnect],
      ['free layout: new notes in free space, notes keep their size, tilt, colour after creation, large emoji', freeLayoutPlacesAndKeepsNotes],
      ['the keepsake: the cover then every note, no editing chrome, and a multi-page PDF', keepsakeForTheRecipient],
      ['401 is a page of its own ("not authorised"), not offline', notAuthorisedIsNotOffline],
      ['with a token, notes are signed with its name, never asked', aTokensNameSignsNotes],
      ['a link to no card, and the keepsake of a card nobody wrote on, get pages of their own', cardsThatCannotBeShown],
      ['1.2: access removed (4403) and card deleted (4410) show an end state, without reconnecting', theBackendEndsTheCard],
      ['examples/browser.html, from another origin, writes a note and sees it saved', theBrowserExampleWorks],
    ];
    for (const [name, run] of scenarios) {
      const started = Date.now();
      const before = problems.length;
      try {
        await run({ browser, server, authServer, problems, shots });
        if (problems.length > before) throw new Error(problems.slice(before).join('\n'));
        passed += 1;
        console.log(`browser test: ok   ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
      } catch (err) {
        if (aborting) break;
        failed += 1;
        console.error(`browser test: FAIL ${name}\n  ${summary(err)}`);
        await screenshotFailure(shots);
        if (!server.child) await server.start().catch(() => {});
      }
    }
  } catch (err) {
    failed += 1;
    console.error(`browser test: FAIL setting up\n  ${summary(err)}`);
  } finally {
    await browser?.close().catch(() => {});
    await server.stop().catch(() => server.kill());
    await authServer.stop().catch(() => authServer.kill());
    await apiServer?.stop().catch(() => apiServer.kill());
  }
  if (aborting) return 1;
  if (failed > 0) printServerLog();
  console.log(`browser test: screenshots in ${config.screenshots}`);
  for (const shot of shots) console.log(`  ${shot}`);
  console.log(`browser test: ${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

function printServerLog() {
  try {
    const lines = readFileSync(join(config.work, 'server.log'), 'utf8').trimEnd().split('\n');
    console.error(`browser test: last lines of the server's log:\n${lines.slice(-30).join('\n')}`);
  } catch { /* no log yet */ }
}

/**
 * Ends the run at once: the browser and the server go with it. Stopped by a
 * signal, the caller (scripts/browser-test.sh's timeout) has the last word.
 */
async function abort(why, { signalled = false } = {}) {
  if (aborting) return;
  aborting = true;
  console.error(`browser test: FAIL ${why}`);
  server.kill();
  authServer.kill();
  apiServer?.kill();
  await withDeadline(browser?.close() ?? Promise.resolve(), 5000, 'the browser to close').catch(() => {});
  if (!signalled) {
    printServerLog();
    console.log('browser test: 0 passed, 1 failed');
  }
  process.exit(1);
}

const watchdog = setTimeout(() => abort(`the whole run took over ${GLOBAL_TIMEOUT_MS / 1000} s`), GLOBAL_TIMEOUT_MS);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(signal, () => abort(`stopped by ${signal}`, { signalled: true }));

main().then((code) => {
  if (aborting) return;
  clearTimeout(watchdog);
  process.exit(code);
});
