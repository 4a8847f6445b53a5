// Types of the rollingpaper client (/client.js) and of every message of
// PROTOCOL.md 1.2.

export const PROTOCOL_VERSION: '1.2';

// ---- PROTOCOL.md section 2: notes and versions --------------------------------

/** A note's id, and a paper's: `^[A-Za-z0-9_-]{1,64}$`. */
export type Id = string;
/** A version assigned by the server: a positive integer below 2^53. */
export type Version = number;

/** The content model by convention; the server never interprets `data`. */
export interface NoteData {
  kind?: 'text' | 'image';
  x?: number;
  y?: number;
  width?: number;
  height?: number;
  text?: string;
  image_url?: string;
  color?: string;
  /** The signature shown with the note, so that it survives its author leaving. */
  author_name?: string;
  [field: string]: unknown;
}

export interface Note {
  id: Id;
  author: string;
  data: NoteData;
  v: Version;
}

/** A deleted note in a snapshot with `since`. */
export interface DeletedNote {
  id: Id;
  deleted: true;
  v: Version;
}

export interface Member {
  id: string;
  user: string;
  name: string;
}

/** The paper's cover (1.1): `{"data":{},"v":0}` until someone sets it. */
export interface CoverData {
  title?: string;
  /** The recipient. */
  to?: string;
  occasion?: string;
  theme?: string;
  [field: string]: unknown;
}

export interface Cover {
  data: CoverData;
  v: Version | 0;
}

// ---- PROTOCOL.md 3.1: server to client ------------------------------------------

export interface SnapshotMessage {
  type: 'snapshot';
  paper: Id;
  you: string;
  completed: boolean;
  meta?: Cover;
  notes: Array<Note | DeletedNote>;
  members: Member[];
  /** 1.1: present when the snapshot holds only what may have changed after this version. */
  since?: Version;
}

export interface UpsertMessage { type: 'upsert'; id: Id; author: string; data: NoteData; v: Version; from: string; ref?: string }
export interface DeleteMessage { type: 'delete'; id: Id; v: Version; from: string; ref?: string }
export interface CursorMessage { type: 'cursor'; from: string; data: Record<string, unknown> }
export interface JoinMessage { type: 'join'; member: Member }
export interface LeaveMessage { type: 'leave'; member: string }
/** 1.1: only the changed fields; `null` removes one. */
export interface PatchMessage { type: 'patch'; id: Id; data: Record<string, unknown>; v: Version; from: string; ref?: string }
/** 1.1: the whole new cover. */
export interface MetaMessage { type: 'meta'; data: CoverData; v: Version; from: string; ref?: string }
export interface CompletedMessage { type: 'completed'; by: string; notes?: Note[] }
export interface SavedMessage { type: 'saved'; v: Version }
export interface PongMessage { type: 'pong' }
export interface ErrorMessage { type: 'error'; code: ErrorCode; message: string; ref?: string }

export type ServerMessage =
  | SnapshotMessage | UpsertMessage | DeleteMessage | CursorMessage | JoinMessage | LeaveMessage
  | PatchMessage | MetaMessage | CompletedMessage | SavedMessage | PongMessage | ErrorMessage;

// ---- PROTOCOL.md 3.2: client to server ------------------------------------------

export type ClientMessage =
  | { type: 'upsert'; id: Id; data: NoteData; ref?: string }
  | { type: 'delete'; id: Id; ref?: string }
  | { type: 'cursor'; data: Record<string, unknown> }
  | { type: 'patch'; id: Id; data: Record<string, unknown>; ref?: string }
  | { type: 'meta'; data: CoverData; ref?: string }
  | { type: 'complete'; ref?: string }
  | { type: 'ping' };

// ---- PROTOCOL.md 3.3: refusals and close codes ----------------------------------

export type ErrorCode =
  | 'invalid_json' | 'invalid_message' | 'too_large' | 'forbidden' | 'paper_completed'
  | 'not_found' | 'paper_full' | 'rate_limited' | 'unavailable' | 'write_failed';

export type CloseCode = 1000 | 1001 | 1002 | 1006 | 1007 | 1008 | 1009 | 1011 | 1013 | EndingCode;

/**
 * 1.2: the main backend ended the session (PROTOCOL.md 7): 4403 revoked this
 * user's access to the paper, 4410 erased the paper. No reconnection follows.
 */
export type EndingCode = 4403 | 4410;

export type Role = 'viewer' | 'writer' | 'owner' | 'service';

// ---- The client ------------------------------------------------------------------

/**
 * A handler the client sets on its socket. Written as a method's type so that
 * its event is compared both ways (as TypeScript compares the DOM's own
 * handlers): a socket whose events carry more than the client reads (the
 * browser's `MessageEvent`, the `ws` package's) is accepted under `strict`, one
 * whose events lack or mistype it is not.
 */
export type SocketHandler<E> = { handle(event: E): void }['handle'];

/** What the client uses of a WebSocket: the browser's, or the `ws` package's under Node. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: SocketHandler<unknown> | null;
  onmessage: SocketHandler<{ data: unknown }> | null;
  onclose: SocketHandler<{ code: number; reason: string }> | null;
  onerror: SocketHandler<unknown> | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
/** The constructor of a WebSocket: the browser's `WebSocket`, or `import WebSocket from 'ws'`. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface RollingPaperOptions {
  paper: Id;
  /** The server, as `http(s)://host:port` or `ws(s)://host:port`; in a page, the page's own. */
  url?: string;
  /** A JWT (auth on); when set, `user` and `name` are not sent. */
  token?: string;
  /** Who the client says it is while auth is off. */
  user?: string;
  name?: string;
  /** Default: the global WebSocket; under Node, pass one (`import WebSocket from 'ws'`). */
  WebSocket?: WebSocketConstructor;
  /** Default: the global fetch; used to tell "not authorised" from "offline". */
  fetch?: typeof fetch;
  backoffMinMs?: number;
  backoffMaxMs?: number;
  editIntervalMs?: number;
  pingAfterQuietMs?: number;
  deadAfterQuietMs?: number;
  retryRefusedMs?: number;
  maxRetries?: number;
  /** Send `?since=` on reconnect (default true). */
  resume?: boolean;
}

/**
 * `unauthorised` and `forbidden` (a refused upgrade), `revoked` (4403),
 * `erased` (4410) and `closed` (`close()`) are final: the client does not
 * reconnect by itself; only a new `connect()` tries again.
 */
export type Status =
  | 'idle' | 'connecting' | 'online' | 'offline' | 'unauthorised' | 'forbidden' | 'revoked' | 'erased' | 'closed';

/** A note as shown: the server's state with this client's pending edits on top. */
export interface ShownNote extends Note {
  /** v is 0 for a note created here and not confirmed yet. */
  pending: boolean;
}

export interface PaperState {
  paper: Id;
  /** This session's member id (the snapshot's `you`); null while not joined. */
  you: string | null;
  user: string | null;
  role: Role | null;
  status: Status;
  completed: boolean;
  /** The user who sealed the paper, when known. */
  completedBy: string | null;
  cover: Cover & { pending?: boolean };
  notes: Record<Id, ShownNote>;
  members: Record<string, Member>;
  /** The greatest version seen: sent as `since` on reconnect. */
  lastV: Version | 0;
  /** The greatest `saved` of this session. */
  savedV: Version | 0;
  /** Edits of this client not settled yet (not saved, refused or unconfirmed). */
  pending: number;
}

/** `complete`: a `complete()`, which is only ever `sent`, `refused` or `unconfirmed` (its success is the `completed` event). */
export type EditKind = 'upsert' | 'patch' | 'delete' | 'meta' | 'complete';
export type EditStatus = 'queued' | 'sent' | 'waiting' | 'applied' | 'saved' | 'refused' | 'write_failed' | 'unconfirmed';

export interface Edit {
  ref: string;
  kind: EditKind;
  /** null for `meta` and `complete`. */
  id: Id | null;
  data: Record<string, unknown> | null;
  status: EditStatus;
  /** The version the server gave it (0 until applied). */
  v: Version | 0;
}

/** What an edit method returns: the ref its outcome carries. */
export interface EditRef {
  ref: string;
}

/** What an edit of a note returns: also the note's id (chosen here for `create`). */
export interface NoteEditRef extends EditRef {
  id: Id;
}

export interface Refusal {
  code: ErrorCode;
  message: string;
  ref: string | null;
  /** The edit it settles, if it carried a ref of this client. */
  edit: Edit | null;
  /** Refused here without asking the server (the paper was sealed). */
  local?: boolean;
  /** `rate_limited` or `unavailable`: the edit is sent again shortly. */
  retrying?: boolean;
}

export type Change =
  | { what: 'notes'; ids: Id[] }
  | { what: 'snapshot'; ids: Id[]; merged: boolean }
  | { what: 'completed'; ids: Id[] }
  | { what: 'cover' }
  | { what: 'members' }
  | { what: 'saved'; v: Version };

export interface RollingPaperEvents {
  /** The state changed; `state` holds the result. */
  change: Change;
  status: { status: Status; code?: number; reason?: string; retryAt?: number; httpStatus?: number };
  snapshot: { since: Version | null; first: boolean; message: SnapshotMessage };
  /** 401 or 403: the client stops trying. */
  denied: { status: 401 | 403; reason: string };
  close: { code: number; reason: string; joined: boolean };
  /**
   * 1.2: the main backend ended the session for good: 4403 revoked this user's
   * access (`revoked`), 4410 erased the paper (`erased`). `status` is the
   * client's status from now on; `reason` is the close frame's text. It comes
   * after `close`, once every edit still held is reported `unconfirmed`.
   */
  ended: { status: 'revoked' | 'erased'; code: EndingCode; reason: string };
  join: Member;
  leave: { id: string; member: Member | null };
  cursor: { from: string; data: Record<string, unknown>; member: Member | null };
  /**
   * The paper was sealed, by `by`. `ref` is the ref of this client's
   * `complete()` waiting for an answer (else null): this is its answer, even
   * when another member's seal came first (`by` says whose).
   */
  completed: { by: string | null; notes: ShownNote[]; ref: string | null };
  sent: Edit;
  /** The server applied this client's edit (its echo arrived) with version `v`. */
  applied: Edit;
  /** In Redis (`saved` V with V >= the edit's v). */
  saved: Edit;
  /** Applied and broadcast, but Redis refused it for good. */
  write_failed: Edit;
  /**
   * Applied, but its session closed before `saved`: it may or may not be
   * stored. At a final close (`ended`) also every edit not applied yet, with
   * `v` 0: no echo of it came, and it will not be sent again. Also a
   * `complete()` with no answer when its session closed (or at `close()`):
   * the next snapshot (`state.completed`) says whether the paper was sealed.
   */
  unconfirmed: Edit;
  refused: Refusal;
  pong: PongMessage;
  /** Every message from the server, before it is applied. */
  message: ServerMessage;
}

export class RollingPaper {
  constructor(options: RollingPaperOptions);
  readonly state: PaperState;
  readonly isOpen: boolean;
  on<K extends keyof RollingPaperEvents>(type: K, listener: (detail: RollingPaperEvents[K]) => void): () => void;
  off<K extends keyof RollingPaperEvents>(type: K, listener: (detail: RollingPaperEvents[K]) => void): void;
  connect(): void;
  close(): void;
  reconnectNow(): void;
  /**
   * Sets the name given to the server while auth is off (a token's `name`
   * wins). An open or opening session is replaced at once by one under the
   * new name, resuming with `since`; the edits held are sent on it.
   */
  setName(name: string | null | undefined): void;
  // Edits. Each returns the ref that its outcome carries (events `sent`,
  // `applied`, `saved`, `write_failed`, `refused`, `unconfirmed`), and the
  // note's id where it names one. Edits of one note merged into one message
  // (made within `editIntervalMs`) share a ref. Once the paper is sealed, each
  // is refused at once (a `refused` event, `local`, with its ref).
  // `data` and `fields` must be plain objects: null, an array, a string or a
  // number throws a TypeError at once, and nothing is sent; so does a bad id.

  /** Creates a note, shown at once. */
  create(data: NoteData, options?: { id?: Id }): NoteEditRef;
  /** Replaces a note's data (upsert). */
  replace(id: Id, data: NoteData): NoteEditRef;
  /** Sets the named fields (1.1 `patch`; `null` removes one). Throws a TypeError when `fields` names none. */
  patch(id: Id, fields: Record<string, unknown>): NoteEditRef;
  /** Deletes a note. */
  remove(id: Id): NoteEditRef;
  /** Replaces the cover (1.1 `meta`). */
  setCover(data: CoverData): EditRef;
  /**
   * Seals the paper (owner only while auth is on), after the edits still
   * queued; sent once, never again by itself. Its ref comes back in the
   * `completed` event, in a `refused` one (`forbidden`, `paper_completed`,
   * ...), or in an `unconfirmed` one when the session closed first. `ref` is
   * null when not connected: nothing was sent.
   */
  complete(): { ref: string | null };
  cursor(data: Record<string, unknown>): boolean;
  ping(): boolean;
  sendRaw(message: ClientMessage): boolean;
  /** Sends queued edits now rather than at the next interval. */
  flush(): void;
  socketUrl(): string;
}

export function isValidId(id: unknown): id is Id;
export function newId(prefix?: string): Id;
/** A JWT's claims, read without checking the signature. */
export function tokenClaims(token: string): Record<string, unknown> | null;
