// roomd browser client: a dependency-free ES module, served by the server at /client.js.
//
// It speaks PROTOCOL.md (v1 + 1.1) over `roomd.v1.json` WebSocket frames, or, when a
// WebSocket cannot connect, reads rooms over Server-Sent Events (`/api/rooms/{room}/
// stream`) and sends ops over HTTP. What it does, like the Rust client (src/client/):
//
// - reconnects with exponential backoff and full jitter;
// - re-subscribes every room `since` its mirror's {epoch, seq} (the server answers
//   `resumed`, or a `snapshot` that replaces the mirror);
// - re-sends every op not yet answered with its original id, in order, so the server's
//   effectively-once record answers it and it applies once (a guest's op sent before a
//   loss is rejected `interrupted` instead: the server does not deduplicate guests);
// - checks every diff: one that does not continue the mirror (another epoch, or
//   `from != seq + 1`) makes it re-subscribe `since` the mirror instead of guessing;
// - refreshes the token before it expires through `getToken` ({"t":"auth"}), and before
//   reconnecting with a token that expired while disconnected;
// - `transport: "auto"` falls back to SSE + HTTP only when WebSocket fails while the
//   server answers HTTP (a server that is down is retried over WebSocket).
//
// `{"$b64": "..."}` values decode to Uint8Array, and Uint8Array values encode back.
// Integers beyond 2^53 lose precision, as everywhere in JavaScript's JSON.
// See README.md ("The browser client") for the API and a complete example.

const SUBPROTOCOL = "roomd.v1.json";

/** The longest delay setTimeout honours (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Close codes after which reconnecting as-is would fail the same way. */
const FATAL_CLOSE = new Set([1002, 1007, 1009, 4400, 4403]);

/** The error a rejected op or create carries: `code` is the nack code. */
export class RoomdError extends Error {
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = "RoomdError";
    this.code = code;
  }
}

// ---------------------------------------------------------------- values and $b64

function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** A wire value (parsed JSON) as a JavaScript value: `{"$b64"}` becomes Uint8Array. */
export function decodeValue(value) {
  if (Array.isArray(value)) return value.map(decodeValue);
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$b64" && typeof value.$b64 === "string") {
      return base64ToBytes(value.$b64);
    }
    const out = {};
    for (const k of keys) out[k] = decodeValue(value[k]);
    return out;
  }
  return value;
}

/** A JavaScript value as a wire value: Uint8Array / ArrayBuffer become `{"$b64"}`. */
export function encodeValue(value) {
  if (value instanceof Uint8Array) return { $b64: bytesToBase64(value) };
  if (value instanceof ArrayBuffer) return { $b64: bytesToBase64(new Uint8Array(value)) };
  if (ArrayBuffer.isView(value)) {
    return { $b64: bytesToBase64(new Uint8Array(value.buffer, value.byteOffset, value.byteLength)) };
  }
  if (Array.isArray(value)) return value.map(encodeValue);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const k of Object.keys(value)) out[k] = encodeValue(value[k]);
    return out;
  }
  return value;
}

// ---------------------------------------------------------------- helpers

/** `exp` (seconds) of a JWT, or null; the token is not verified here. */
function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

function randomHex(bytes) {
  const buf = new Uint8Array(bytes);
  crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}

/** Resolves the server's base URL into its WebSocket and HTTP forms. */
function endpoints(url) {
  const base = new URL(url ?? globalThis.location?.origin ?? "http://127.0.0.1:8080",
    globalThis.location?.href);
  const secure = base.protocol === "https:" || base.protocol === "wss:";
  const host = base.host;
  const path = base.pathname.replace(/\/ws\/?$/, "").replace(/\/$/, "");
  return {
    ws: `${secure ? "wss" : "ws"}://${host}${path}/ws`,
    http: `${secure ? "https" : "http"}://${host}${path}`,
  };
}

// ---------------------------------------------------------------- Room

/**
 * One subscribed room: a live mirror of its entries, and its events.
 *
 * Events (CustomEvent, data in `event.detail`):
 * - `change`: `{source: "snapshot"|"resumed"|"diff", changes, from, to, reset}` after
 *   the mirror changed; `changes` lists `{key, value, ver, deleted}`; `reset` is true
 *   when a snapshot replaced the mirror (first one, or the epoch changed / resume failed).
 * - `presence`: `{members, join, leave}` (with `presence: true`); `room.members` is
 *   the current Map of user -> connection count (counts known from full lists only).
 * - `signal`: `{user, data}` from another member.
 * - `error`: `{code, msg}` for this room (e.g. `not_found`, `forbidden`); the
 *   subscription ends.
 */
export class Room extends EventTarget {
  constructor(client, id, options) {
    super();
    /** The room id. */
    this.id = id;
    /** Room kind (`chat`, `poll`, `state`) once the first snapshot arrived. */
    this.kind = null;
    /** The epoch (16 hex chars) the mirror's seq belongs to. */
    this.epoch = null;
    /** Seq of the last event reflected in `entries` (0 before the first snapshot). */
    this.seq = 0;
    /** The public state: key -> `{value, ver}`, sorted by key on every snapshot. */
    this.entries = new Map();
    /** Members (with `presence: true`): user -> connection count. */
    this.members = new Map();
    /** True once the first snapshot arrived. */
    this.ready = false;
    this._client = client;
    this._presence = !!options.presence;
    /** Set while a `sub` is outstanding: diffs are ignored until its answer. */
    this._syncing = false;
    this._closed = false;
    this._readyWaiters = [];
  }

  /** The value at `key` (undefined when absent). */
  get(key) {
    return this.entries.get(key)?.value;
  }

  /** The `ver` of `key` (0 when absent: use it as `if_ver` to create). */
  ver(key) {
    return this.entries.get(key)?.ver ?? 0;
  }

  /** Resolves once the first snapshot is in the mirror. */
  whenReady() {
    if (this.ready) return Promise.resolve(this);
    return new Promise((resolve, reject) => this._readyWaiters.push({ resolve, reject }));
  }

  /** Applies an op to this room: see `Client.op`. */
  op(op) {
    return this._client.op(this.id, op);
  }

  /** Sends an ephemeral signal to the room's other members (WebSocket only). */
  signal(data) {
    return this._client.signal(this.id, data);
  }

  /** Stops receiving this room. */
  unsubscribe() {
    this._client._unsubscribe(this);
  }

  _since() {
    return this.epoch ? { epoch: this.epoch, seq: this.seq } : undefined;
  }

  _apply(changes) {
    const out = [];
    for (const e of changes) {
      if (e.del) {
        this.entries.delete(e.k);
        out.push({ key: e.k, value: undefined, ver: e.ver, deleted: true });
      } else {
        const value = decodeValue(e.v);
        this.entries.set(e.k, { value, ver: e.ver });
        out.push({ key: e.k, value, ver: e.ver, deleted: false });
      }
    }
    return out;
  }

  /** Handles a room frame; returns false when the room must re-subscribe. */
  _frame(msg) {
    switch (msg.t) {
      case "snapshot": {
        const reset = true;
        this.kind = msg.kind;
        this.epoch = msg.epoch;
        this.seq = msg.seq;
        this.entries = new Map();
        const changes = this._apply(msg.entries);
        this._syncing = false;
        this._markReady();
        emit(this, "change", { source: "snapshot", changes, from: 1, to: msg.seq, reset });
        return true;
      }
      case "resumed": {
        if (msg.epoch !== this.epoch || msg.from > this.seq + 1) return false;
        const changes = this._apply(msg.changes);
        this.seq = Math.max(this.seq, msg.to);
        this._syncing = false;
        this._markReady();
        emit(this, "change", { source: "resumed", changes, from: msg.from, to: msg.to, reset: false });
        return true;
      }
      case "diff": {
        if (this._syncing) return true;
        if (msg.epoch === this.epoch && msg.to <= this.seq) return true; // already seen
        if (msg.epoch !== this.epoch || msg.from !== this.seq + 1) return false;
        const changes = this._apply(msg.changes);
        this.seq = msg.to;
        emit(this, "change", { source: "diff", changes, from: msg.from, to: msg.to, reset: false });
        return true;
      }
      case "presence": {
        if (msg.members) {
          this.members = new Map(msg.members.map((m) => [m.user, m.conns]));
        }
        for (const user of msg.join ?? []) if (!this.members.has(user)) this.members.set(user, 1);
        for (const user of msg.leave ?? []) this.members.delete(user);
        emit(this, "presence", { members: this.members, join: msg.join ?? [], leave: msg.leave ?? [] });
        return true;
      }
      case "signal":
        emit(this, "signal", { user: msg.user, data: decodeValue(msg.data) });
        return true;
      default:
        return true;
    }
  }

  _markReady() {
    if (this.ready) return;
    this.ready = true;
    for (const w of this._readyWaiters.splice(0)) w.resolve(this);
  }

  _fail(code, msg) {
    this._closed = true;
    for (const w of this._readyWaiters.splice(0)) w.reject(new RoomdError(code, msg));
    emit(this, "error", { code, msg });
  }
}

// ---------------------------------------------------------------- Client

/**
 * A connection to a roomd server that keeps going across lost connections.
 *
 * Events: `state` (`{state, attempt, delay, code, reason, transport}`; states are
 * `connecting`, `open`, `reconnecting`, `closed`), `welcome` (the server's welcome
 * frame), `authed` (`{exp}`: a refreshed token was accepted), `error` (`{code, msg}`
 * not tied to a room or op, e.g. a refreshed token the server refused).
 */
export class Client extends EventTarget {
  constructor(url, options = {}) {
    super();
    const ends = endpoints(url);
    this._wsUrl = ends.ws;
    this._httpUrl = ends.http;
    this._opts = {
      transport: "auto",
      reconnect: {},
      ...options,
    };
    this._backoff = { base: 250, cap: 5000, ...(this._opts.reconnect || {}) };
    /** User id (auth off) or the JWT (auth on) this client identifies with. */
    this._user = options.user ?? null;
    this._token = options.token ?? null;
    /** `connecting`, `open`, `reconnecting` or `closed`. */
    this.state = "connecting";
    /** `ws` or `sse`: the transport in use. */
    this.transport = this._opts.transport === "sse" ? "sse" : "ws";
    /** The user id the server gave this connection (from `welcome`, or the option). */
    this.user = this._user;
    /** Rooms by id. */
    this.rooms = new Map();
    this._pending = new Map(); // op id -> {room, msg, resolve, reject, sent}
    this._httpInFlight = 0; // ops and creates sent over HTTP (SSE transport), unanswered
    this._httpQueue = Promise.resolve(); // they go one at a time, in order
    this._prefix = randomHex(6);
    this._counter = 0;
    this._attempt = 0;
    this._everOpen = false;
    this._ws = null;
    this._timer = null;
    this._refreshTimer = null;
    this._welcome = null;
    this._openWaiters = [];
    // Started on the next microtask, so listeners added right after `connect()` see the
    // first `state` event (the SSE transport is `open` at once).
    queueMicrotask(() => this.state !== "closed" && this._start());
  }

  /** Ops and creates sent or queued but not yet answered (over HTTP too). */
  get pendingOps() {
    return this._pending.size + this._httpInFlight;
  }

  /** Resolves once connected (the welcome arrived, or the SSE transport is in use). */
  ready() {
    if (this.state === "open") return Promise.resolve(this);
    return new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }));
  }

  /**
   * Subscribes to a room and returns its live mirror (`Room`). Subscribing again to the
   * same room returns the same object.
   */
  subscribe(roomId, options = {}) {
    let room = this.rooms.get(roomId);
    if (room) return room;
    room = new Room(this, roomId, options);
    this.rooms.set(roomId, room);
    this._sub(room);
    return room;
  }

  /**
   * Applies `op` to a room. Resolves to the ack's seq once the op is durable; rejects
   * with a `RoomdError` whose `code` is the nack code. Ops made while disconnected wait
   * and are sent on reconnect; ops in flight are re-sent with their original id.
   */
  op(roomId, op) {
    return this._request({ t: "op", room: roomId, op: encodeValue(op) });
  }

  /** Creates a room (`kind`: chat, poll, state). Resolves to 1 (the creation's seq). */
  create(roomId, kind, init = {}) {
    return this._request({ t: "create", room: roomId, kind, init: encodeValue(init) });
  }

  /**
   * Sends an ephemeral signal to a subscribed room's other members. Returns false when
   * it could not be sent now (disconnected, or the SSE transport, which cannot signal).
   */
  signal(roomId, data) {
    if (this.transport !== "ws" || this.state !== "open") return false;
    this._send({ t: "signal", room: roomId, data: encodeValue(data) });
    return true;
  }

  /**
   * Drops the current connection and reconnects after `delayMs` (default 0), resuming
   * every room and re-sending unanswered ops (e.g. after the network changed).
   */
  reconnect(delayMs = 0) {
    if (this.state === "closed") return;
    this._drop();
    for (const p of this._pending.values()) if (p.sent) p.resent = true;
    this._scheduleReconnect(delayMs, "reconnect asked");
  }

  /** Ends the client: every unanswered op is rejected `closed`. */
  close() {
    this._setState("closed", {});
    this._drop();
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    for (const [, p] of this._pending) p.reject(new RoomdError("closed", "client closed"));
    this._pending.clear();
    for (const w of this._openWaiters.splice(0)) w.reject(new RoomdError("closed", "client closed"));
  }

  // ------------------------------------------------------------ internals

  _identityQuery() {
    const q = new URLSearchParams();
    if (this._token) q.set("token", this._token);
    else if (this._user) q.set("user", this._user);
    return q;
  }

  _start() {
    if (this.transport === "sse") return this._openSse();
    this._openWs();
  }

  _setState(state, extra) {
    this.state = state;
    emit(this, "state", { state, transport: this.transport, ...extra });
  }

  _openWs() {
    const q = this._identityQuery();
    const qs = q.toString();
    let ws;
    try {
      ws = new WebSocket(this._wsUrl + (qs ? `?${qs}` : ""), SUBPROTOCOL);
    } catch (e) {
      return this._lost(1006, String(e), false);
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        emit(this, "error", { code: "protocol", msg: "a server frame is not JSON" });
        return;
      }
      this._onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._lost(ev.code, ev.reason, opened);
    };
  }

  _onWelcome(msg) {
    this._welcome = msg;
    this.user = msg.user;
    this._attempt = 0;
    this._everOpen = true;
    this._setState("open", {});
    emit(this, "welcome", msg);
    // Rooms first (each answered snapshot/resumed in order), then ops in their order.
    for (const room of this.rooms.values()) if (!room._closed) this._sub(room);
    for (const [id, p] of this._pending) {
      if (p.sent && this._isGuest()) {
        this._pending.delete(id);
        p.reject(new RoomdError("interrupted", "a guest's op was sent before the connection was lost"));
        continue;
      }
      p.sent = true;
      this._send(p.msg);
    }
    for (const w of this._openWaiters.splice(0)) w.resolve(this);
    this._scheduleRefresh();
  }

  _isGuest() {
    return !this._user && !this._token && String(this.user).startsWith("guest-");
  }

  _onMessage(msg) {
    switch (msg.t) {
      case "welcome":
        return this._onWelcome(msg);
      case "ack": {
        const p = this._pending.get(msg.id);
        if (!p) return;
        this._pending.delete(msg.id);
        return p.resolve(msg.seq);
      }
      case "nack": {
        const p = this._pending.get(msg.id);
        if (!p) return;
        if (msg.code === "rate_limited" && p.resent) {
          // A re-sent op refused before the room: it never reached the log; try again.
          setTimeout(() => this.state === "open" && this._pending.has(msg.id) && this._send(p.msg), 1000);
          return;
        }
        this._pending.delete(msg.id);
        return p.reject(new RoomdError(msg.code, msg.msg));
      }
      case "authed":
        return emit(this, "authed", { exp: msg.exp ?? null });
      case "error": {
        const room = msg.room && this.rooms.get(msg.room);
        if (room) {
          this.rooms.delete(msg.room);
          return room._fail(msg.code, msg.msg);
        }
        return emit(this, "error", { code: msg.code, msg: msg.msg });
      }
      default: {
        const room = msg.room && this.rooms.get(msg.room);
        if (room && !room._closed && !room._frame(msg)) this._resync(room);
      }
    }
  }

  /** A gap or epoch change: re-subscribe since the mirror (never paper over it). */
  _resync(room) {
    if (this.transport === "sse") {
      this._closeStream(room);
      return this._openStream(room);
    }
    this._sub(room);
  }

  _sub(room) {
    if (this.transport === "sse") {
      if (this.state !== "closed") this._openStream(room);
      return;
    }
    if (this.state !== "open") return;
    room._syncing = true;
    const msg = { t: "sub", room: room.id };
    if (room._presence) msg.presence = true;
    const since = room._since();
    if (since) msg.since = since;
    this._send(msg);
  }

  _unsubscribe(room) {
    room._closed = true;
    this.rooms.delete(room.id);
    if (this.transport === "sse") return this._closeStream(room);
    if (this.state === "open") this._send({ t: "unsub", room: room.id });
  }

  _send(msg) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(msg));
  }

  _request(body) {
    const id = `${this._prefix}-${++this._counter}`;
    return new Promise((resolve, reject) => {
      if (this.state === "closed") return reject(new RoomdError("closed", "client closed"));
      const msg = { ...body, id };
      const p = { msg, resolve, reject, sent: false, resent: false };
      if (this.transport === "sse") return this._httpRequest(p);
      this._pending.set(id, p);
      if (this.state === "open") {
        p.sent = true;
        this._send(msg);
      }
    });
  }

  _lost(code, reason, opened) {
    if (this.state === "closed") return;
    for (const p of this._pending.values()) if (p.sent) p.resent = true;
    if (code === 4401 && !this._opts.getToken) {
      return this._fatal(code, reason || "unauthorized");
    }
    if (FATAL_CLOSE.has(code)) return this._fatal(code, reason);
    // `auto`: a WebSocket that never opened twice in a row, while the server answers
    // HTTP, falls back to SSE + HTTP (a server that is down keeps being retried over
    // WebSocket instead).
    if (this._opts.transport === "auto" && !opened && !this._everOpen && this._attempt >= 1) {
      return this._probeHttp().then((reachable) => {
        if (this.state === "closed" || this._ws) return;
        if (!reachable) return this._scheduleReconnect(null, reason, code);
        this.transport = "sse";
        this._attempt = 0;
        this._openSse();
      });
    }
    this._scheduleReconnect(null, reason, code);
  }

  /** Whether the server answers HTTP at all (any status; CORS does not matter here). */
  async _probeHttp() {
    try {
      await fetch(`${this._httpUrl}/healthz`, { mode: "no-cors", cache: "no-store" });
      return true;
    } catch {
      return false;
    }
  }

  _fatal(code, reason) {
    this._setState("closed", { code, reason });
    const err = new RoomdError(code === 4401 ? "unauthorized" : "closed", `closed ${code} ${reason ?? ""}`);
    for (const p of this._pending.values()) p.reject(err);
    this._pending.clear();
    for (const w of this._openWaiters.splice(0)) w.reject(err);
  }

  _scheduleReconnect(fixedDelay, reason, code) {
    clearTimeout(this._timer);
    this._attempt += 1;
    const ceiling = Math.min(this._backoff.cap, this._backoff.base * 2 ** Math.min(this._attempt - 1, 20));
    const delay = fixedDelay ?? Math.random() * ceiling;
    this._setState("reconnecting", { attempt: this._attempt, delay, code, reason });
    this._timer = setTimeout(async () => {
      if (this.state === "closed") return;
      // A token that expired while disconnected would only be refused (4401): ask first.
      const exp = this._token && tokenExpiry(this._token);
      const expired = exp != null && exp * 1000 <= Date.now() + 5000;
      if ((code === 4401 || expired) && this._opts.getToken) {
        try {
          this._token = await this._opts.getToken();
        } catch (e) {
          return this._fatal(4401, `getToken failed: ${e}`);
        }
      }
      this._start();
    }, delay);
  }

  _drop() {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try {
        ws.close();
      } catch {
        /* already closed */
      }
    }
    for (const room of this.rooms.values()) this._closeStream(room);
  }

  /** Asks `getToken` for a fresh token a little before this one expires. */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    const exp = this._token && tokenExpiry(this._token);
    if (!exp || !this._opts.getToken) return;
    const lead = Math.max(0, (exp - 30) * 1000 - Date.now());
    // setTimeout fires at once for delays beyond 2^31 - 1 ms (24.8 days): wait in steps.
    if (lead > MAX_TIMER_MS) {
      this._refreshTimer = setTimeout(() => this._scheduleRefresh(), MAX_TIMER_MS);
      return;
    }
    this._refreshTimer = setTimeout(async () => {
      if (this.state === "closed") return;
      try {
        const token = await this._opts.getToken();
        if (this.state === "closed") return;
        this._token = token;
        if (this.transport === "ws") this._send({ t: "auth", token });
        const fresh = tokenExpiry(token);
        if (fresh != null && fresh <= exp) {
          // Asking again at once would loop; the server's 4401 at exp asks once more.
          emit(this, "error", { code: "unauthorized", msg: "getToken returned a token that expires no later than the current one" });
          return;
        }
        this._scheduleRefresh();
      } catch (e) {
        emit(this, "error", { code: "unauthorized", msg: `getToken failed: ${e}` });
      }
    }, lead);
  }

  // ------------------------------------------------------------ SSE + HTTP transport

  _openSse() {
    this._everOpen = true;
    this._setState("open", {});
    for (const room of this.rooms.values()) if (!room._closed) this._openStream(room);
    // Ops queued for the WebSocket go over HTTP now, with their ids.
    const queued = [...this._pending.values()];
    this._pending.clear();
    for (const p of queued) this._httpRequest(p);
    for (const w of this._openWaiters.splice(0)) w.resolve(this);
  }

  _openStream(room) {
    this._closeStream(room);
    const q = this._identityQuery();
    if (room._presence) q.set("presence", "1");
    const since = room._since();
    if (since) q.set("since", `${since.epoch}:${since.seq}`);
    room._syncing = true;
    const source = new EventSource(`${this._httpUrl}/api/rooms/${encodeURIComponent(room.id)}/stream?${q}`);
    room._source = source;
    const onFrame = (ev) => {
      if (room._source !== source) return;
      const msg = JSON.parse(ev.data);
      if (!room._frame(msg)) this._resync(room);
    };
    for (const type of ["snapshot", "resumed", "diff", "presence"]) source.addEventListener(type, onFrame);
    source.addEventListener("open", () => {
      if (room._source === source && this.state === "reconnecting") this._setState("open", {});
    });
    source.addEventListener("error", (ev) => {
      if (room._source !== source) return;
      if (typeof ev.data === "string") {
        // The server's `event: error` (e.g. the room was deleted): the stream ends.
        let msg = {};
        try {
          msg = JSON.parse(ev.data);
        } catch {
          /* keep the defaults */
        }
        this._closeStream(room);
        this.rooms.delete(room.id);
        return room._fail(msg.code ?? "not_found", msg.msg ?? "the stream ended");
      }
      // A dropped stream: the browser reconnects it by itself with its Last-Event-ID.
      if (this.state === "open") this._setState("reconnecting", { reason: "stream dropped" });
      if (source.readyState !== EventSource.CLOSED) return;
      // The browser gave up (an HTTP error, not a dropped stream): find out why, retry.
      room._source = null;
      this._streamFailed(room);
    });
  }

  async _streamFailed(room) {
    try {
      const res = await fetch(`${this._httpUrl}/api/rooms/${encodeURIComponent(room.id)}?${this._identityQuery()}`);
      if (res.status === 404 || res.status === 403 || res.status === 401) {
        const body = await res.json().catch(() => ({}));
        this.rooms.delete(room.id);
        return room._fail(body.code ?? "not_found", body.msg ?? `HTTP ${res.status}`);
      }
    } catch {
      /* the server is down: retry below */
    }
    const delay = Math.random() * this._backoff.cap;
    setTimeout(() => !room._closed && this.state !== "closed" && this._openStream(room), delay);
  }

  _closeStream(room) {
    if (room._source) {
      room._source.close();
      room._source = null;
    }
  }

  _httpRequest(p) {
    // Counted in `pendingOps` until answered (the count drops before the promise settles).
    this._httpInFlight += 1;
    let done = false;
    const settle = (fn) => (value) => {
      if (!done) this._httpInFlight -= 1;
      done = true;
      fn(value);
    };
    // One request at a time, in the order made: retried ops (the server was down) must
    // not overtake each other, as they do not over WebSocket either.
    const run = () => this._httpSend({ ...p, resolve: settle(p.resolve), reject: settle(p.reject) })
      .catch(settle(p.reject));
    this._httpQueue = this._httpQueue.then(run, run);
    return this._httpQueue;
  }

  async _httpSend(p) {
    const { msg } = p;
    const headers = { "content-type": "application/json" };
    if (this._token) headers.authorization = `Bearer ${this._token}`;
    else if (this._user) headers["x-roomd-user"] = this._user;
    const create = msg.t === "create";
    const url = create
      ? `${this._httpUrl}/api/rooms`
      : `${this._httpUrl}/api/rooms/${encodeURIComponent(msg.room)}/ops`;
    const body = create
      ? { room: msg.room, kind: msg.kind, init: msg.init }
      : { id: msg.id, op: msg.op };
    for (let attempt = 1; this.state !== "closed"; attempt++) {
      let res;
      try {
        res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body) });
      } catch (e) {
        // The server is unreachable. An op carries its id, so re-sending is safe; a
        // create over HTTP carries none, so it is not retried.
        if (create) return p.reject(new RoomdError("unavailable", String(e)));
        await new Promise((r) => setTimeout(r, Math.random() * Math.min(this._backoff.cap, this._backoff.base * 2 ** attempt)));
        continue;
      }
      const reply = await res.json().catch(() => ({}));
      if (res.ok) return p.resolve(reply.seq);
      if ((res.status === 429 || res.status === 503) && !create && attempt < 5) {
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      return p.reject(new RoomdError(reply.code ?? `http_${res.status}`, reply.msg));
    }
    p.reject(new RoomdError("closed", "client closed"));
  }
}

/**
 * Connects to a roomd server. `url` is its base URL (`http://host:port`; `ws://` and a
 * trailing `/ws` also work; default: the page's origin). Options: `user` (auth off) or
 * `token` (auth on), `getToken` (async, for refresh and 4401), `transport` (`"auto"`
 * default, `"ws"`, `"sse"`), `reconnect` (`{base, cap}` in ms, default 250 / 5000).
 */
export function connect(url, options) {
  return new Client(url, options);
}
