// rollingpaper client: one paper, one WebSocket, PROTOCOL.md 1.2.
//
// A dependency-free ES module for browsers and Node (pass a WebSocket
// implementation, such as the `ws` package, where there is no global one).
// It keeps the paper's state as a plain object (`client.state`), applies the
// server's messages in the order received, shows this client's own edits at
// once (optimistically) and reconciles them by `ref` and `v`, reconnects with
// backoff and jitter, and resumes with `since`.
//
// It stops for good, without reconnecting, on `close()`, on a refused upgrade
// (401, 403: event `denied`), and when the main backend ends the session
// (1.2): the close codes 4403 (this user's access to the paper was revoked)
// and 4410 (the paper was erased) set the final status `revoked` or `erased`
// and emit one `ended` event, `{status, code, reason}`. The edits it still held
// are each reported `unconfirmed` (with `v` 0 when no echo of them came, so
// they were most likely never applied), never dropped silently.
//
// Every edit method returns an object holding the `ref` that its outcome
// carries (events `sent`, `applied`, `saved`, `write_failed`, `refused`,
// `unconfirmed`, and `completed` for `complete()`), and the note's `id` where
// it names a note:
//
//   create(data, {id?}) -> {id, ref}     remove(id)     -> {id, ref}
//   replace(id, data)   -> {id, ref}     setCover(data) -> {ref}
//   patch(id, fields)   -> {id, ref}     complete()     -> {ref}, {ref: null} when not connected
//
// Edits of one note made within `editIntervalMs` are merged into one message
// and share its ref. A note's or the cover's `data` (and a patch's `fields`)
// must be a plain object: anything else (null, an array, a string, a number)
// throws a TypeError at once, and nothing is sent.
//
//   import { RollingPaper } from '/client.js';
//   const rp = new RollingPaper({ paper: 'birthday-kim', name: 'Ann' });
//   rp.on('change', (change) => render(rp.state, change));
//   rp.on('saved', ({ ref }) => markSaved(ref));
//   rp.connect();
//   const { id, ref } = rp.create({ kind: 'text', text: 'Happy birthday!' });
//   rp.patch(id, { x: 40, y: 80 });
//
// Under Node, pass `url` and a WebSocket (`import WebSocket from 'ws'`):
// examples/node.mjs. Types: /client.d.ts.

export const PROTOCOL_VERSION = '1.2';

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
// Codes after which the same edit may succeed a little later.
const RETRYABLE = new Set(['rate_limited', 'unavailable']);
const OPEN = 1;
// 1.2: close codes after which the client does not reconnect, and the final
// status each one sets.
const ENDINGS = { 4403: 'revoked', 4410: 'erased' };

const DEFAULTS = {
  backoffMinMs: 500,
  backoffMaxMs: 10000,
  // Edits are sent at most this often; edits of one note made in between are
  // merged into one message (the server allows 50 messages a second).
  editIntervalMs: 50,
  // Browsers cannot send ping frames; a `ping` message after a quiet spell
  // makes silence mean something.
  pingAfterQuietMs: 15000,
  deadAfterQuietMs: 25000,
  retryRefusedMs: 1000,
  maxRetries: 5,
  resume: true,
};

/** True for a valid paper or note id. */
export function isValidId(id) {
  return typeof id === 'string' && ID_PATTERN.test(id);
}

/** A random note id (`n-` and 12 letters or digits). */
export function newId(prefix = 'n-') {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = new Uint8Array(12);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return prefix + Array.from(bytes, (b) => alphabet[b % alphabet.length]).join('');
}

/** The claims of a JWT, read without checking its signature (the server checks it). */
export function tokenClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = typeof atob === 'function'
      ? decodeURIComponent(Array.from(atob(part), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''))
      : globalThis.Buffer.from(part, 'base64').toString('utf8');
    const claims = JSON.parse(json);
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** True for a plain object (`{}`, `JSON.parse`'s, `Object.create(null)`), as `data` must be. */
function isPlainObject(value) {
  if (!isObject(value)) return false;
  const proto = Object.getPrototypeOf(value);
  // The last case: a plain object of another realm (an iframe's).
  return proto === null || proto === Object.prototype || Object.getPrototypeOf(proto) === null;
}

/** A copy of `value`, which must be a plain object; else a TypeError naming `what`. */
function plainData(value, what) {
  if (!isPlainObject(value)) {
    const got = value === null || value === undefined ? String(value)
      : Array.isArray(value) ? 'an array'
        : typeof value === 'object' ? 'an object that is not plain' : `a ${typeof value}`;
    throw new TypeError(`${what} must be a plain object (not null, an array, a string or a number); got ${got}`);
  }
  return { ...value };
}

function isVersion(v) {
  return Number.isSafeInteger(v) && v > 0;
}

/** `data` with `fields` set, and the fields set to null removed (a patch). */
function patched(data, fields) {
  const out = { ...data };
  for (const [key, value] of Object.entries(fields)) {
    if (value === null) delete out[key];
    else out[key] = value;
  }
  return out;
}

export class RollingPaper {
  /**
   * @param {object} options see RollingPaperOptions in client.d.ts
   */
  constructor(options = {}) {
    if (!isValidId(options.paper)) throw new TypeError('paper must match ^[A-Za-z0-9_-]{1,64}$');
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.fetch = options.fetch || (globalThis.fetch && globalThis.fetch.bind(globalThis));
    if (!this.WebSocket) throw new TypeError('no WebSocket: pass one as options.WebSocket');
    this.base = serverBase(options.url);
    this.claims = options.token ? tokenClaims(options.token) : null;

    /** The paper as this client shows it: the server's state with this client's pending edits on top. */
    this.state = {
      paper: options.paper,
      you: null,
      user: this.claims?.sub ?? options.user ?? null,
      role: this.claims?.role ?? (options.token ? null : 'owner'),
      status: 'idle',
      completed: false,
      completedBy: null,
      cover: { data: {}, v: 0 },
      notes: {},
      members: {},
      lastV: 0,
      savedV: 0,
      pending: 0,
    };

    this.listeners = new Map();
    this.ws = null;
    this.joined = false;
    this.attempt = 0;
    this.timers = { reconnect: null, flush: null, keepalive: null };
    this.lastHeard = 0;
    this.lastFlush = 0;
    this.refSeq = 0;
    this.stopped = true;
    // Set by setName() while its session is replaced.
    this.renaming = false;
    // Set when the server turns `patch` down (protocol 1.0).
    this.patchless = false;
    // The server's truth, as last received.
    this.confirmed = new Map(); // id -> { id, author, data, v, baseV, fieldV }
    this.gone = new Map(); // id -> v of its delete
    this.cover = { data: {}, v: 0 };
    // This client's edits not settled yet, in the order made.
    this.edits = [];
    // This client's `complete` messages not answered yet, by ref (sent at
    // once, never queued nor sent again).
    this.completes = new Map();
    // Refs of completes answered by `completed`: a `paper_completed` with one
    // of them (it reached the server just after the seal) is that answer again.
    this.answeredCompletes = new Set();
  }

  // ---- Events -----------------------------------------------------------------

  /** Calls `listener(detail)` on each event of `type`; returns a function that stops it. */
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.listeners.get(type)?.delete(listener);
  }

  emit(type, detail) {
    for (const listener of [...(this.listeners.get(type) || [])]) {
      try {
        listener(detail);
      } catch (err) {
        // One listener's bug must not stop the protocol.
        queueMicrotask(() => { throw err; });
      }
    }
  }

  // ---- Connection ---------------------------------------------------------------

  /** Opens the session (and keeps it open, reconnecting, until `close()`). */
  connect() {
    this.stopped = false;
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = null;
    if (this.ws) return;
    this.setStatus('connecting');
    let ws;
    try {
      ws = new this.WebSocket(this.socketUrl());
    } catch (err) {
      this.onClosed({ code: 1006, reason: String(err?.message || err), opened: false });
      return;
    }
    this.ws = ws;
    this.joined = false;
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      const data = event.data;
      this.onText(typeof data === 'string' ? data : String(data));
    };
    ws.onerror = () => {};
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.onClosed({ code: event.code, reason: event.reason || '', opened });
    };
  }

  /** Ends the session for good (no reconnection). */
  close() {
    this.stopped = true;
    clearTimeout(this.timers.reconnect);
    clearTimeout(this.timers.flush);
    this.timers.flush = null;
    this.stopKeepalive();
    const ws = this.ws;
    this.ws = null;
    this.joined = false;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      try { ws.close(1000); } catch { /* already closing */ }
    }
    this.state.you = null;
    this.settleCompletes();
    this.setStatus('closed');
  }

  /**
   * Sets the name this client gives the server while auth is off (a token's
   * `name` claim wins over it). A session that is open or opening is replaced
   * at once by one under the new name, which resumes with `since`; the edits
   * held are sent on it, as after any reconnection. Otherwise the next
   * session carries it.
   */
  setName(name) {
    if (name !== undefined && name !== null && typeof name !== 'string') throw new TypeError('name must be a string');
    this.options.name = name || undefined;
    if (this.options.token || this.stopped || !this.ws) return;
    const ws = this.ws;
    ws.onclose = null;
    ws.onmessage = null;
    try { ws.close(1000); } catch { /* already closing */ }
    this.renaming = true;
    this.onClosed({ code: 1000, reason: 'renamed', opened: true });
  }

  /** Tries again now instead of waiting for the backoff (e.g. the network came back). */
  reconnectNow() {
    if (!this.stopped && !this.ws && this.state.status !== 'unauthorised' && this.state.status !== 'forbidden') {
      this.attempt = 0;
      this.connect();
    }
  }

  /** The address of the next session: the token or user and name, and `since` when resuming. */
  socketUrl() {
    const query = new URLSearchParams();
    const { token, user, name } = this.options;
    if (token) query.set('token', token);
    else {
      if (user) query.set('user', user);
      if (name) query.set('name', name);
    }
    if (this.options.resume && this.state.lastV > 0) query.set('since', String(this.state.lastV));
    const q = query.toString();
    return `${this.base.ws}/ws/${this.state.paper}${q ? '?' + q : ''}`;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === OPEN && this.joined;
  }

  setStatus(status, detail = {}) {
    const changed = this.state.status !== status;
    this.state.status = status;
    if (changed || detail.reason) this.emit('status', { status, ...detail });
  }

  async onClosed({ code, reason, opened }) {
    const wasJoined = this.joined;
    this.ws = null;
    this.joined = false;
    this.state.you = null;
    this.stopKeepalive();
    clearTimeout(this.timers.flush);
    this.timers.flush = null;
    if (Object.keys(this.state.members).length) {
      this.state.members = {};
      this.emit('change', { what: 'members' });
    }
    // 1.2: the main backend revoked this user's access, or erased the paper:
    // no session will follow, so nothing is sent again.
    const ended = ENDINGS[code];
    if (ended) {
      this.stopped = true;
      clearTimeout(this.timers.reconnect);
      this.timers.reconnect = null;
    }
    this.settleAtClose({ final: Boolean(ended) });
    // The next session may be on another node, whose versions can be lower:
    // a `saved` of this one must never confirm an edit of the next.
    this.state.savedV = 0;
    this.emit('close', { code, reason, joined: wasJoined });
    if (ended) {
      this.setStatus(ended, { code, reason });
      this.emit('ended', { status: ended, code, reason });
      return;
    }
    if (this.stopped) return;
    // A refused upgrade (401, 403) reaches a WebSocket only as a close
    // without a code; an expired token closes the session with 1008.
    if (!opened || code === 1008) {
      const denied = await this.probeAccess();
      if (this.stopped || this.ws) return;
      if (denied) {
        this.stopped = true;
        this.setStatus(denied.status === 401 ? 'unauthorised' : 'forbidden', {
          httpStatus: denied.status, reason: denied.reason,
        });
        this.emit('denied', denied);
        return;
      }
    }
    if (this.renaming) {
      this.renaming = false;
      this.connect();
      return;
    }
    this.scheduleReconnect(code, reason);
  }

  /**
   * Asks the server over plain HTTP whether this client may open the paper.
   * The WebSocket path answers a request without upgrade headers with 426
   * before it looks at the token (PROTOCOL.md 1), so the token is also shown
   * to `GET /papers/{paper}`, which checks it first.
   * Returns `{status, reason}` when access is refused, else null.
   */
  async probeAccess() {
    if (!this.fetch) return null;
    try {
      const url = this.socketUrl().replace(/^ws/, 'http');
      const direct = await this.fetch(url, { cache: 'no-store', credentials: 'same-origin' });
      if (direct.status === 401 || direct.status === 403) {
        return { status: direct.status, reason: (await direct.text()).trim() };
      }
      // The server answers: a token whose own claims rule this session out is the reason.
      const claims = this.claims;
      if (claims && (claims.paper !== this.state.paper || claims.role === 'service')) {
        return { status: 403, reason: claims.role === 'service' ? 'a service token cannot open a session' : 'this token is for another paper' };
      }
      const headers = this.options.token ? { Authorization: `Bearer ${this.options.token}` } : {};
      const read = await this.fetch(`${this.base.http}/papers/${this.state.paper}`, { cache: 'no-store', headers });
      if (read.status === 401) return { status: 401, reason: (await read.text()).trim() };
      return null;
    } catch {
      return null; // unreachable: offline, not refused
    }
  }

  scheduleReconnect(code, reason) {
    const delay = this.backoff(this.attempt++);
    this.retryAt = Date.now() + delay;
    this.timers.reconnect = setTimeout(() => this.connect(), delay);
    this.setStatus('offline', { code, reason, retryAt: this.retryAt });
  }

  /** Exponential backoff with jitter, so that many clients do not return in the same instant. */
  backoff(attempt) {
    const ceiling = Math.min(this.options.backoffMaxMs, this.options.backoffMinMs * 2 ** Math.min(attempt, 20));
    return ceiling / 2 + Math.random() * ceiling / 2;
  }

  startKeepalive() {
    this.stopKeepalive();
    this.lastHeard = Date.now();
    const every = Math.max(50, Math.min(5000, this.options.pingAfterQuietMs / 3));
    this.timers.keepalive = setInterval(() => {
      const quiet = Date.now() - this.lastHeard;
      if (quiet > this.options.deadAfterQuietMs) this.abandonSocket();
      else if (quiet > this.options.pingAfterQuietMs) this.sendRaw({ type: 'ping' });
    }, every);
  }

  stopKeepalive() {
    clearInterval(this.timers.keepalive);
    this.timers.keepalive = null;
  }

  /** Drops a silent socket now: a dead link never completes a close handshake. */
  abandonSocket() {
    const ws = this.ws;
    if (!ws) return;
    ws.onclose = null;
    ws.onmessage = null;
    try { ws.close(); } catch { /* already closing */ }
    this.onClosed({ code: 1006, reason: 'no answer from the server', opened: true });
  }

  // ---- Messages from the server -------------------------------------------------

  onText(text) {
    this.lastHeard = Date.now();
    let msg;
    try { msg = JSON.parse(text); } catch { return; }
    if (!isObject(msg)) return;
    this.emit('message', msg);
    switch (msg.type) {
      case 'snapshot': this.onSnapshot(msg); break;
      case 'upsert': this.onUpsert(msg); break;
      case 'patch': this.onPatch(msg); break;
      case 'delete': this.onDelete(msg); break;
      case 'meta': this.onMeta(msg); break;
      case 'join': this.onJoin(msg); break;
      case 'leave': this.onLeave(msg); break;
      case 'cursor': this.emit('cursor', { from: msg.from, data: msg.data, member: this.state.members[msg.from] ?? null }); break;
      case 'completed': this.onCompleted(msg); break;
      case 'saved': this.onSaved(msg); break;
      case 'error': this.onError(msg); break;
      case 'pong': this.emit('pong', msg); break;
      default: break; // types a newer server may add
    }
  }

  seen(v) {
    if (isVersion(v) && v > this.state.lastV) this.state.lastV = v;
  }

  onSnapshot(msg) {
    const merge = isVersion(msg.since) || msg.since === 0;
    if (!merge) {
      this.confirmed.clear();
      this.gone.clear();
    }
    const ids = new Set(merge ? [] : this.visibleIds());
    for (const n of Array.isArray(msg.notes) ? msg.notes : []) {
      if (!isObject(n) || !isValidId(n.id)) continue;
      ids.add(n.id);
      this.seen(n.v);
      if (n.deleted) {
        this.confirmed.delete(n.id);
        this.gone.set(n.id, n.v);
      } else {
        this.confirmed.set(n.id, confirmedNote(n));
        this.gone.delete(n.id);
      }
    }
    if (isObject(msg.meta)) this.cover = { data: isObject(msg.meta.data) ? msg.meta.data : {}, v: Number(msg.meta.v) || 0 };
    else if (!merge) this.cover = { data: {}, v: 0 };
    this.state.members = {};
    for (const m of Array.isArray(msg.members) ? msg.members : []) if (isObject(m) && m.id) this.state.members[m.id] = m;
    this.state.completed = Boolean(msg.completed);
    if (!this.state.completed) this.state.completedBy = null;
    const first = !this.joined;
    this.state.you = msg.you ?? this.state.you;
    this.joined = true;
    this.attempt = 0;
    this.startKeepalive();
    if (this.state.completed) this.dropEdits('paper_completed', 'the paper is sealed');
    for (const id of this.visibleIds()) ids.add(id);
    this.refresh(ids);
    this.refreshCover();
    this.emit('snapshot', { since: merge ? msg.since : null, first, message: msg });
    this.emit('change', { what: 'snapshot', ids: [...ids], merged: merge });
    this.setStatus('online');
    // Edits made offline, or sent and never answered, go (again) now.
    for (const edit of this.edits) if (edit.status === 'sent') edit.status = 'queued';
    this.scheduleFlush(true);
  }

  onUpsert(msg) {
    if (!isValidId(msg.id) || !isVersion(msg.v)) return;
    this.seen(msg.v);
    this.settleEcho(msg);
    const current = this.confirmed.get(msg.id);
    if (current ? msg.v <= current.baseV : msg.v <= (this.gone.get(msg.id) || 0)) return this.refresh([msg.id]);
    const data = isObject(msg.data) ? { ...msg.data } : {};
    const fieldV = {};
    // A field patched later than this write keeps its value (PROTOCOL.md 2).
    if (current) {
      for (const [key, v] of Object.entries(current.fieldV)) {
        if (v > msg.v) {
          if (key in current.data) data[key] = current.data[key];
          else delete data[key];
          fieldV[key] = v;
        }
      }
    }
    this.confirmed.set(msg.id, { id: msg.id, author: msg.author, data, v: Math.max(msg.v, current?.v || 0), baseV: msg.v, fieldV });
    this.gone.delete(msg.id);
    this.refresh([msg.id]);
  }

  onPatch(msg) {
    if (!isValidId(msg.id) || !isVersion(msg.v) || !isObject(msg.data)) return;
    this.seen(msg.v);
    this.settleEcho(msg);
    const current = this.confirmed.get(msg.id);
    if (current) {
      const fields = {};
      for (const [key, value] of Object.entries(msg.data)) {
        if (msg.v > (current.fieldV[key] ?? current.baseV)) {
          fields[key] = value;
          current.fieldV[key] = msg.v;
        }
      }
      current.data = patched(current.data, fields);
      current.v = Math.max(current.v, msg.v);
    }
    this.refresh([msg.id]);
  }

  onDelete(msg) {
    if (!isValidId(msg.id) || !isVersion(msg.v)) return;
    this.seen(msg.v);
    this.settleEcho(msg);
    const current = this.confirmed.get(msg.id);
    if (current && msg.v > current.baseV) {
      this.confirmed.delete(msg.id);
      this.gone.set(msg.id, msg.v);
    } else if (!current) {
      this.gone.set(msg.id, Math.max(msg.v, this.gone.get(msg.id) || 0));
    }
    this.refresh([msg.id]);
  }

  onMeta(msg) {
    if (!isVersion(msg.v)) return;
    this.settleEcho(msg);
    if (msg.v > this.cover.v) this.cover = { data: isObject(msg.data) ? msg.data : {}, v: msg.v };
    this.refreshCover();
  }

  onJoin(msg) {
    const m = msg.member;
    if (!isObject(m) || !m.id) return;
    this.state.members[m.id] = m;
    this.emit('join', m);
    this.emit('change', { what: 'members' });
  }

  onLeave(msg) {
    const member = this.state.members[msg.member] ?? null;
    delete this.state.members[msg.member];
    this.emit('leave', { id: msg.member, member });
    this.emit('change', { what: 'members' });
  }

  onCompleted(msg) {
    this.state.completed = true;
    this.state.completedBy = typeof msg.by === 'string' ? msg.by : null;
    const ids = new Set(this.visibleIds());
    // 1.1: `notes` is the paper exactly as sealed, and replaces the view.
    if (Array.isArray(msg.notes)) {
      this.confirmed.clear();
      for (const n of msg.notes) {
        if (!isObject(n) || !isValidId(n.id) || n.deleted) continue;
        this.seen(n.v);
        this.confirmed.set(n.id, confirmedNote(n));
        ids.add(n.id);
      }
    }
    this.dropEdits('paper_completed', 'the paper is sealed', { keepSent: true });
    // The answer to this client's `complete`, if one was waiting (`by` says
    // who sealed: another member's seal may have come first).
    const answered = [...this.completes.keys()];
    this.completes.clear();
    for (const ref of answered) this.answeredCompletes.add(ref);
    this.refresh(ids);
    this.refreshCover();
    this.emit('completed', { by: this.state.completedBy, notes: this.visibleNotes(), ref: answered[0] ?? null });
    this.emit('change', { what: 'completed', ids: [...ids] });
  }

  onSaved(msg) {
    if (!isVersion(msg.v)) return;
    this.state.savedV = Math.max(this.state.savedV, msg.v);
    const settled = [];
    this.edits = this.edits.filter((edit) => {
      if (edit.status === 'applied' && edit.v <= msg.v) {
        settled.push(edit);
        return false;
      }
      return true;
    });
    for (const edit of settled) this.emit('saved', publicEdit(edit, 'saved'));
    this.updatePending();
    this.emit('change', { what: 'saved', v: msg.v });
  }

  onError(msg) {
    const completing = typeof msg.ref === 'string' ? this.completes.get(msg.ref) : undefined;
    if (completing) {
      // A seal is refused for good (forbidden, paper_completed, ...); it is not
      // sent again by itself.
      this.completes.delete(msg.ref);
      this.emit('refused', { code: msg.code, message: msg.message || '', ref: msg.ref, edit: publicEdit(completing, 'refused') });
      return;
    }
    if (msg.code === 'paper_completed' && this.answeredCompletes.has(msg.ref)) return;
    const edit = typeof msg.ref === 'string' ? this.edits.find((e) => e.ref === msg.ref) : undefined;
    const refusal = { code: msg.code, message: msg.message || '', ref: msg.ref ?? null, edit: edit ? publicEdit(edit) : null };
    if (edit && msg.code === 'write_failed') {
      // Applied and broadcast, but not stored: the server sends the correction.
      this.removeEdit(edit);
      this.emit('write_failed', publicEdit(edit, 'write_failed'));
    } else if (edit && RETRYABLE.has(msg.code) && edit.tries < this.options.maxRetries && edit.status !== 'applied') {
      edit.status = 'waiting';
      setTimeout(() => {
        if (this.edits.includes(edit) && edit.status === 'waiting') {
          edit.status = 'queued';
          this.scheduleFlush();
        }
      }, this.options.retryRefusedMs);
      refusal.retrying = true;
    } else if (edit && edit.kind === 'patch' && msg.code === 'invalid_message' && !this.patchless) {
      // A server of protocol 1.0 knows no `patch`: from now on this client
      // sends the whole note instead (which loses a concurrent edit of other
      // fields, as 1.0 does).
      this.patchless = true;
      edit.status = 'queued';
      this.scheduleFlush();
      refusal.retrying = true;
    } else if (edit) {
      this.removeEdit(edit);
      this.refreshFor(edit);
    }
    this.emit('refused', refusal);
  }

  /** An echo of this client's edit: it is applied, with version `v`, and waits for `saved`. */
  settleEcho(msg) {
    if (msg.from !== this.state.you || typeof msg.ref !== 'string') return;
    const edit = this.edits.find((e) => e.ref === msg.ref);
    if (!edit) return;
    edit.status = 'applied';
    edit.v = msg.v;
    this.emit('applied', publicEdit(edit));
    if (msg.v <= this.state.savedV) {
      this.removeEdit(edit);
      this.emit('saved', publicEdit(edit, 'saved'));
    }
  }

  // ---- The view -------------------------------------------------------------------

  visibleIds() {
    return Object.keys(this.state.notes);
  }

  visibleNotes() {
    return Object.values(this.state.notes);
  }

  /** Recomputes the shown notes `ids` from the server's state and pending edits, and says which changed. */
  refresh(ids) {
    const changed = [];
    for (const id of ids) {
      const before = this.state.notes[id];
      const after = this.viewOf(id);
      if (after) this.state.notes[id] = after;
      else delete this.state.notes[id];
      if (!sameNote(before, after)) changed.push(id);
    }
    this.updatePending();
    if (changed.length) this.emit('change', { what: 'notes', ids: changed });
  }

  refreshFor(edit) {
    if (edit.kind === 'meta') this.refreshCover();
    else this.refresh([edit.id]);
  }

  viewOf(id) {
    const c = this.confirmed.get(id);
    let note = c ? { id, author: c.author, data: c.data, v: c.v, pending: false } : null;
    if (this.state.completed) return note;
    for (const edit of this.edits) {
      if (edit.id !== id || edit.kind === 'meta' || edit.status === 'applied') continue;
      if (edit.kind === 'upsert') {
        note = { id, author: note?.author ?? this.state.user, data: edit.data, v: note?.v ?? 0, pending: true };
      } else if (edit.kind === 'patch' && note) {
        note = { ...note, data: patched(note.data, edit.data), pending: true };
      } else if (edit.kind === 'delete') {
        note = null;
      }
    }
    return note;
  }

  refreshCover() {
    let cover = this.cover;
    if (!this.state.completed) {
      for (const edit of this.edits) {
        if (edit.kind === 'meta' && edit.status !== 'applied') cover = { data: edit.data, v: cover.v, pending: true };
      }
    }
    const before = this.state.cover;
    this.state.cover = cover;
    this.updatePending();
    if (JSON.stringify(before) !== JSON.stringify(cover)) this.emit('change', { what: 'cover' });
  }

  updatePending() {
    this.state.pending = this.edits.length;
  }

  // ---- Edits ------------------------------------------------------------------------

  /** Creates a note (shown at once); returns `{id, ref}`. */
  create(data, { id = newId() } = {}) {
    const copy = plainData(data, 'a note\'s data');
    return { id, ref: this.edit('upsert', id, copy) };
  }

  /** Replaces a note's data (an upsert); returns `{id, ref}`. */
  replace(id, data) {
    const copy = plainData(data, 'a note\'s data');
    return { id, ref: this.edit('upsert', id, copy) };
  }

  /**
   * Sets the named fields of a note (`null` removes one); other fields,
   * changed by others meanwhile, stay. Returns `{id, ref}`.
   */
  patch(id, fields) {
    const copy = plainData(fields, 'a patch\'s fields');
    // The server refuses a patch that names no field (invalid_message), which
    // must not be taken for a server that knows no patch.
    if (Object.keys(copy).length === 0) throw new TypeError('a patch names at least one field');
    return { id, ref: this.edit('patch', id, copy) };
  }

  /** Deletes a note; returns `{id, ref}`. */
  remove(id) {
    return { id, ref: this.edit('delete', id, null) };
  }

  /** Replaces the paper's cover (`title`, `to`, `occasion`, `theme` by convention); returns `{ref}`. */
  setCover(data) {
    const copy = plainData(data, 'the cover\'s data');
    return { ref: this.edit('meta', null, copy) };
  }

  /**
   * Seals the paper (owner only while auth is on), after sending the edits
   * still queued. Returns `{ref}`: the `completed` event carries it when the
   * paper is sealed, a `refused` event when the seal is refused (`forbidden`,
   * `paper_completed`, ...), an `unconfirmed` one when the session closed
   * first. It is sent once, never again by itself. `{ref: null}` when not
   * connected: nothing was sent.
   */
  complete() {
    if (this.state.completed) {
      const ref = 'r' + (++this.refSeq);
      const edit = { ref, kind: 'complete', id: null, data: null, status: 'refused', tries: 0 };
      queueMicrotask(() => this.emit('refused', { code: 'paper_completed', message: 'the paper is sealed', ref, edit: publicEdit(edit), local: true }));
      return { ref };
    }
    this.flush();
    if (!this.isOpen) return { ref: null };
    const edit = { ref: 'r' + (++this.refSeq), kind: 'complete', id: null, data: null, status: 'sent', tries: 1, v: 0 };
    this.completes.set(edit.ref, edit);
    this.ws.send(JSON.stringify({ type: 'complete', ref: edit.ref }));
    this.emit('sent', publicEdit(edit));
    return { ref: edit.ref };
  }

  /** Transient state (pointer, typing) for the others; dropped while offline. */
  cursor(data) {
    return this.sendRaw({ type: 'cursor', data });
  }

  ping() {
    return this.sendRaw({ type: 'ping' });
  }

  /** Sends one message as given, when connected; true if sent. */
  sendRaw(message) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  edit(kind, id, data) {
    if (kind !== 'meta' && !isValidId(id)) throw new TypeError('a note id must match ^[A-Za-z0-9_-]{1,64}$');
    if (this.state.completed) {
      const ref = 'r' + (++this.refSeq);
      const edit = { ref, kind, id, data, status: 'refused', tries: 0 };
      queueMicrotask(() => this.emit('refused', { code: 'paper_completed', message: 'the paper is sealed', ref, edit: publicEdit(edit), local: true }));
      return ref;
    }
    // An edit of a note not sent yet merges into the one before it: typing
    // and dragging make many, and only the latest state matters.
    const last = this.edits[this.edits.length - 1];
    let edit;
    if (last && last.status === 'queued' && last.id === id && last.kind === kind && kind !== 'delete') {
      last.data = kind === 'patch' ? { ...last.data, ...data } : data;
      edit = last;
    } else if (last && last.status === 'queued' && last.id === id && last.kind === 'upsert' && kind === 'patch') {
      last.data = patched(last.data, data);
      edit = last;
    } else {
      edit = { ref: 'r' + (++this.refSeq), kind, id, data, status: 'queued', tries: 0, v: 0 };
      this.edits.push(edit);
    }
    this.refreshFor(edit);
    this.scheduleFlush();
    return edit.ref;
  }

  scheduleFlush(now = false) {
    if (this.timers.flush || !this.isOpen) return;
    const wait = now ? 0 : Math.max(0, this.lastFlush + this.options.editIntervalMs - Date.now());
    this.timers.flush = setTimeout(() => this.flush(), wait);
  }

  /** Sends every queued edit now (when connected). */
  flush() {
    clearTimeout(this.timers.flush);
    this.timers.flush = null;
    if (!this.isOpen || this.state.completed) return;
    this.lastFlush = Date.now();
    for (const edit of this.edits) {
      if (edit.status !== 'queued') continue;
      edit.status = 'sent';
      edit.tries += 1;
      const msg = { type: edit.kind, ref: edit.ref };
      if (edit.id !== null) msg.id = edit.id;
      if (edit.data !== null) msg.data = edit.data;
      if (edit.kind === 'patch' && this.patchless) {
        msg.type = 'upsert';
        msg.data = this.state.notes[edit.id]?.data ?? edit.data;
      }
      this.ws.send(JSON.stringify(msg));
      this.emit('sent', publicEdit(edit));
    }
  }

  removeEdit(edit) {
    this.edits = this.edits.filter((e) => e !== edit);
    this.updatePending();
  }

  /** Ends the edits that cannot succeed any more, each with a `refused` event. */
  dropEdits(code, message, { keepSent = false } = {}) {
    const dropped = this.edits.filter((e) => e.status !== 'applied' && !(keepSent && e.status === 'sent'));
    this.edits = this.edits.filter((e) => !dropped.includes(e));
    for (const edit of dropped) this.emit('refused', { code, message, ref: edit.ref, edit: publicEdit(edit), local: true });
    this.updatePending();
  }

  /**
   * A closed session's `saved` can never come: its applied edits are reported
   * `unconfirmed`. Sent ones with no answer are sent again after the next snapshot.
   * After a `final` close (4403, 4410) no snapshot will come: every edit still
   * held is reported `unconfirmed` (`v` 0: no echo came), and the view drops
   * the ones it showed on top of the server's state.
   */
  settleAtClose({ final = false } = {}) {
    const unconfirmed = this.edits.filter((e) => final || e.status === 'applied');
    this.edits = this.edits.filter((e) => !unconfirmed.includes(e));
    for (const edit of unconfirmed) this.emit('unconfirmed', publicEdit(edit, 'unconfirmed'));
    this.settleCompletes();
    this.updatePending();
    if (!final || !unconfirmed.length) return;
    this.refresh(new Set(unconfirmed.filter((e) => e.kind !== 'meta').map((e) => e.id)));
    if (unconfirmed.some((e) => e.kind === 'meta')) this.refreshCover();
  }

  /**
   * A `complete` with no answer when its session closed may or may not have
   * sealed the paper (the next snapshot says): each is reported `unconfirmed`.
   */
  settleCompletes() {
    const unanswered = [...this.completes.values()];
    this.completes.clear();
    for (const edit of unanswered) this.emit('unconfirmed', publicEdit(edit, 'unconfirmed'));
  }
}

function confirmedNote(n) {
  return { id: n.id, author: n.author, data: isObject(n.data) ? { ...n.data } : {}, v: n.v, baseV: n.v, fieldV: {} };
}

function sameNote(a, b) {
  if (!a || !b) return a === b;
  return a.v === b.v && a.author === b.author && a.pending === b.pending && JSON.stringify(a.data) === JSON.stringify(b.data);
}

function publicEdit(edit, status = edit.status) {
  return { ref: edit.ref, kind: edit.kind, id: edit.id, data: edit.data, status, v: edit.v || 0 };
}

/** `{http, ws}` bases of the server from `url` (http(s) or ws(s)), or from the page's own address. */
function serverBase(url) {
  let u;
  if (url) u = new URL(url);
  else if (globalThis.location?.host) u = new URL(globalThis.location.href);
  else throw new TypeError('url is required outside a browser page');
  const secure = u.protocol === 'https:' || u.protocol === 'wss:';
  return { http: `${secure ? 'https' : 'http'}://${u.host}`, ws: `${secure ? 'wss' : 'ws'}://${u.host}` };
}
