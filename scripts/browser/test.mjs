// End-to-end test of the page served at `/`, in headless Chromium driven by
// playwright-core. People open the same paper in separate browser contexts:
// what one writes, drags or deletes appears at the others; the owner's cover is
// seen by all; a note dragged by one while another types in it keeps both
// changes (field patches); signatures stay after their author leaves; sealing
// shows the final card; a phone-sized page fits; a server with auth on is
// answered "not authorised", not "offline"; after a server restart the pages
// come back by themselves with every note. Last, 1.2: when the main backend
// revokes a person (4403) or erases the card (4410) through its API, the page
// shows an end state of its own, without the card, and does not reconnect.
// And examples/browser.html, served as its header says (a static server on
// another origin), writes a note and sees it saved.
// axe-core checks the main views for serious or critical accessibility
// violations. The servers are started and restarted here
// (scripts/browser-test.sh starts Redis and passes its URL).
//
// Every wait is a condition with a deadline; nothing sleeps to synchronise.
//
// Environment: RP_BIN (server binary), RP_REDIS (redis URL), RP_PORT and
// RP_AUTH_PORT (ports for the server and for one with auth on), RP_WORK (a
// scratch directory), RP_SCREENSHOTS (where screenshots go), CHROMIUM
// (default /usr/bin/chromium).

import { spawn } from 'node:child_process';
import { openSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer as createHttpServer } from 'node:http';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const GLOBAL_TIMEOUT_MS = 240_000;
const STEP_TIMEOUT_MS = 15_000;
// Pages back off up to 10 s between attempts while the server is away.
const RECONNECT_TIMEOUT_MS = 30_000;
const SERVER_EXIT_TIMEOUT_MS = 20_000;
// PROTOCOL.md 7: at least 32 bytes.
const API_KEY = 'browser-test-api-key-0123456789abcdef';
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
    () => document.querySelector('[data-testid=connection]')?.dataset.state === 'online', null, timeout);
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
 * on any serious or critical violation; `what` names the view in the error.
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
      .filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.impact} ${v.id}: ${v.help} (${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join('; ')})`);
  });
  if (violations.length) throw new Error(`${page.label}: accessibility of ${what}:\n  ${violations.join('\n  ')}`);
}

async function addNote(page, text) {
  const before = await page.locator('[data-testid=note]').evaluateAll((cards) => cards.map((c) => c.dataset.noteId));
  await page.getByTestId('add-note').click();
  await waitUntil(page, 'a new note to take focus', () => document.activeElement?.closest('[data-testid=note]') != null);
  const id = await page.evaluate(() => document.activeElement.closest('[data-testid=note]').dataset.noteId);
  if (before.includes(id)) throw new Error(`${page.label}: the focused note ${id} is not a new one`);
  // Typed key by key, so that the live updates of typing are what is tested.
  await page.keyboard.type(text, { delay: 15 });
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

// ---- Scenarios -------------------------------------------------------------------

async function openPaperAs(page, url, name) {
  await page.goto(url);
  await waitOnline(page);
  if (name) {
    await page.getByTestId('name-input').fill(name);
    await page.getByTestId('name-input').press('Enter');
    await waitOnline(page);
  }
}

async function useFreeLayout(page) {
  await page.getByTestId('layout-free').check();
  await waitUntil(page, 'the free layout', () => document.querySelector('[data-testid=board]').dataset.layout === 'free');
}

async function waitSaved(page) {
  await waitUntil(page, 'all changes saved', () => document.querySelector('[data-testid=saved]')?.dataset.state === 'saved');
}

/** The messages a page sends on its WebSocket, parsed. */
function recordSent(page) {
  const sent = [];
  page.on('websocket', (ws) => ws.on('framesent', (frame) => {
    try { sent.push(JSON.parse(frame.payload)); } catch { /* not JSON */ }
  }));
  return sent;
}

async function twoPeopleWriteTogether({ browser, server, problems, shots }) {
  const paper = `e2e-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);

  // Ann picks a paper from the form; Ben follows the shared link and names himself.
  await ann.goto(`${base}/`);
  await checkAccessibility(ann, 'the landing form');
  await ann.getByTestId('paper-input').fill(paper);
  await ann.getByTestId('landing-name').fill('Ann');
  await ann.getByTestId('open-paper').click();
  await waitOnline(ann);
  const shared = ann.url();
  if (!shared.includes(`paper=${paper}`)) throw new Error(`the address ${shared} does not name the paper`);
  await openPaperAs(ben, shared, 'Ben');
  await waitMember(ann, 'Ben');
  await waitMember(ben, 'Ann');
  await useFreeLayout(ann);
  await useFreeLayout(ben);

  // A note typed by Ann appears, with its text, at Ben's; Ben cannot edit it.
  const text = 'Happy birthday, Kim! 🎂 Thank you for every Friday cake.';
  const id = await addNote(ann, text);
  await waitNoteText(ben, id, text);
  if (await ben.locator(`[data-note-id="${id}"] textarea`).count() !== 0) {
    throw new Error('Ben may edit the text of a note Ann wrote');
  }

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

  // Ben writes too, and a note Ann deletes disappears at Ben's.
  const benText = 'Have a wonderful year ahead! <b>Cheers</b>';
  const benNote = await addNote(ben, benText);
  await waitNoteText(ann, benNote, benText);
  if (await ann.locator(`[data-note-id="${benNote}"] b`).count() !== 0) throw new Error('note text was rendered as HTML');
  const scrap = await addNote(ann, 'oops, wrong paper');
  await waitNoteText(ben, scrap, 'oops, wrong paper');
  await ann.locator(`[data-note-id="${scrap}"] [data-testid=note-delete]`).click();
  await waitUntil(ben, `note ${scrap} to disappear`, (id) => !document.querySelector(`[data-note-id="${id}"]`), scrap);

  // Everything Ann and Ben wrote is in Redis before the restart.
  for (const page of [ann, ben]) await waitSaved(page);
  await checkAccessibility(ann, 'the free layout');
  await ann.mouse.move(board.x + 900, board.y + 400, { steps: 3 });
  shots.push(await screenshot(ann, '1-ann-free-layout'), await screenshot(ben, '2-ben-free-layout'));

  // The server restarts: both pages say they are offline, then come back alone.
  const exit = await server.stop();
  if (exit.code !== 0) throw new Error(`the server exited with ${JSON.stringify(exit)} after SIGTERM`);
  for (const page of [ann, ben]) {
    await waitUntil(page, 'the offline banner', () => {
      const banner = document.querySelector('[data-testid=offline-banner]');
      return banner !== null && !banner.hidden && banner.offsetHeight > 0
        && document.querySelector('[data-testid=connection]').dataset.state !== 'online';
    });
  }
  shots.push(await screenshot(ben, '3-ben-offline'));
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
  await checkAccessibility(ann, 'the cover form');
  await ann.getByTestId('cover-title-input').fill('Happy birthday, Kim! 🎉');
  await ann.getByTestId('cover-to-input').fill('Kim');
  await ann.getByTestId('cover-occasion-input').fill('Birthday');
  await ann.getByTestId('cover-save').click();
  for (const page of [ann, ben]) {
    await waitUntil(page, 'the cover', () =>
      document.querySelector('[data-testid=cover-title]').textContent === 'Happy birthday, Kim! 🎉'
      && document.querySelector('[data-testid=cover-to]').textContent === 'For Kim'
      && document.querySelector('[data-testid=cover-occasion]').textContent === 'Birthday');
  }
  await addNote(ann, 'Happy birthday! May the year be as kind to you as you are to us.');
  await addNote(ben, 'Cake on Friday is on me 🍰');
  for (const page of [ann, ben]) await waitSaved(page);

  // A late joiner sees the cover in its snapshot.
  const cat = await openPage(browser, 'Cat', problems);
  await openPaperAs(cat, `${base}/?paper=${paper}`);
  await waitUntil(cat, 'the cover', () => document.querySelector('[data-testid=cover-title]').textContent === 'Happy birthday, Kim! 🎉');

  // The link to share names the paper, not the person.
  await ben.getByTestId('copy-link').click();
  await waitUntil(ben, 'the copied link', () => [...document.querySelectorAll('[data-testid=toast]')].some((t) => t.textContent.includes('?paper=')));
  await checkAccessibility(ben, 'the card with its cover and notes');
  shots.push(await screenshot(ben, '4-desktop-card'));
  for (const page of [ann, ben, cat]) await page.context().close();
}

async function typingAndDraggingAtOnceConverge({ browser, problems }) {
  const paper = `e2e-race-${Date.now().toString(36)}`;
  const ann = await openPage(browser, 'Ann', problems);
  const ben = await openPage(browser, 'Ben', problems);
  const annSent = recordSent(ann);
  const benSent = recordSent(ben);
  await openPaperAs(ann, `${base}/?paper=${paper}`);
  await openPaperAs(ben, `${base}/?paper=${paper}`);
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
  const id = await addNote(ann, 'Good luck in Lisbon!');
  await waitNoteText(ben, id, 'Good luck in Lisbon!');
  await waitSaved(ann);
  await ann.context().close();
  await waitUntil(ben, 'Ann to leave', () =>
    ![...document.querySelectorAll('[data-testid=member-name]')].some((m) => m.textContent === 'Ann'));
  const signed = (id) => document.querySelector(`[data-note-id="${id}"] [data-testid=note-author]`)?.textContent === '— Ann';
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
  const id = await addNote(ann, 'Congratulations on the new job!');
  await addNote(ben, 'So proud of you 🥳');
  await waitNoteText(ben, id, 'Congratulations on the new job!');

  await ben.getByTestId('complete').click();
  await ben.getByTestId('complete-yes').click();
  for (const page of [ann, ben]) {
    await waitUntil(page, 'the final card', () => {
      const banner = document.querySelector('[data-testid=completed-banner]');
      const stamp = document.querySelector('[data-testid=sealed-stamp]');
      return banner !== null && !banner.hidden && /sealed/.test(banner.textContent)
        && document.querySelector('[data-testid=final-card]') !== null && stamp.offsetHeight > 0
        && document.querySelectorAll('[data-testid=note]').length === 2;
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
  await checkAccessibility(ben, 'the final card');
  shots.push(await screenshot(ben, '5-final-card'));
  await ann.context().close();
  await ben.context().close();
}

async function onAPhone({ browser, problems, shots }) {
  const paper = `e2e-phone-${Date.now().toString(36)}`;
  const kim = await openPage(browser, 'Kim', problems, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  await kim.goto(`${base}/`);
  await checkAccessibility(kim, 'the landing form on a phone');
  await openPaperAs(kim, `${base}/?paper=${paper}`, 'Kim');
  await kim.getByTestId('edit-cover').click();
  await kim.getByTestId('cover-title-input').fill('Farewell, Sam');
  await kim.getByTestId('cover-to-input').fill('Sam');
  await kim.getByTestId('cover-occasion-input').fill('Farewell');
  await kim.getByTestId('cover-save').click();
  await waitUntil(kim, 'the cover', () => document.querySelector('[data-testid=cover-title]').textContent === 'Farewell, Sam');
  await addNote(kim, 'We will miss you, Sam! Send us pictures from the mountains 🏔️');
  await addNote(kim, 'Thank you for all the help.');
  await waitSaved(kim);
  await kim.locator(':focus').blur();
  const layout = await kim.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    add: document.querySelector('[data-testid=add-note]').getBoundingClientRect().right,
    note: document.querySelector('[data-testid=note]').getBoundingClientRect().right,
  }));
  if (layout.scroll > 390 || layout.add > 390 || layout.note > 390) throw new Error(`the card is wider than the phone: ${JSON.stringify(layout)}`);
  await checkAccessibility(kim, 'the card on a phone');
  shots.push(await screenshot(kim, '6-phone-card'));
  await kim.context().close();
}

async function notAuthorisedIsNotOffline({ browser, problems, shots, authServer }) {
  const paper = `e2e-auth-${Date.now().toString(36)}`;
  const authBase = `http://127.0.0.1:${authServer.port}`;
  const eve = await openPage(browser, 'Eve', problems, {}, authBase);
  await eve.goto(`${authBase}/?paper=${paper}`);
  await waitUntil(eve, '"not authorised"', () => {
    const pill = document.querySelector('[data-testid=connection]');
    const banner = document.querySelector('[data-testid=denied-banner]');
    return pill.dataset.state === 'unauthorised' && pill.textContent === 'Not authorised'
      && !banner.hidden && /not authorised/.test(banner.textContent)
      && document.querySelector('[data-testid=offline-banner]').hidden;
  });
  await checkAccessibility(eve, 'the "not authorised" view');
  shots.push(await screenshot(eve, '7-not-authorised'));
  await eve.context().close();
}

/** Waits for the page's end state: `title` focused, no card, no control to use, no offline notice. */
async function waitEnded(page, title) {
  await waitUntil(page, `the end state "${title}"`, (title) => {
    const view = document.querySelector('[data-testid=ended]');
    const heading = document.querySelector('[data-testid=ended-title]');
    const shown = (e) => e.getClientRects().length > 0;
    return view !== null && shown(view) && heading.textContent === title && document.activeElement === heading
      && !shown(document.getElementById('card')) && !shown(document.querySelector('[data-testid=connection]'))
      && !shown(document.querySelector('[data-testid=offline-banner]'))
      && ![...document.querySelectorAll('button, input, textarea, select')].some(shown);
  }, title);
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
  await checkAccessibility(ann, 'the "access removed" view');
  shots.push(await screenshot(ann, '8-access-removed'));

  // The main backend erases the card: Ben's page ends too.
  const erased = await backendApi(api, 'DELETE', `/api/papers/${paper}`);
  if (erased.status !== 204) throw new Error(`erase answered ${erased.status} ${erased.text}`);
  await waitEnded(ben, 'This card was deleted.');
  await checkAccessibility(ben, 'the "card deleted" view');
  shots.push(await screenshot(ben, '9-card-deleted'));
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
  port: Number(env('RP_AUTH_PORT')), name: 'auth-server', args: ['--store', 'memory', '--jwt-secret', 'browser-test-secret-0123456789'],
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
      ['two people write, drag and delete together, and survive a server restart', twoPeopleWriteTogether],
      ['the owner sets the cover, the others see it', coverSetByTheOwner],
      ['typing and dragging one note at once keep both (patch)', typingAndDraggingAtOnceConverge],
      ['signatures outlive their authors', signaturesOutliveTheirAuthors],
      ['sealing shows the final card to everyone', completingSealsThePaper],
      ['the card on a phone (390x844)', onAPhone],
      ['401 is shown as "not authorised", not offline', notAuthorisedIsNotOffline],
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
