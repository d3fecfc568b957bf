// TypeScript declarations for roomd's browser client (/client.js). The module is plain
// JavaScript with no dependencies; see README.md ("The browser client").

/** A decoded value: `{"$b64"}` bytes arrive as Uint8Array. */
export type Value =
  | null
  | boolean
  | number
  | string
  | Uint8Array
  | Value[]
  | { [key: string]: Value };

/** An op or create rejected by the server; `code` is the nack code (`conflict`, ...). */
export class RoomdError extends Error {
  readonly code: string;
}

export interface Entry {
  value: Value;
  /** Seq of the event that last changed the key. */
  ver: number;
}

export interface Change {
  key: string;
  /** Undefined when `deleted`. */
  value: Value | undefined;
  ver: number;
  deleted: boolean;
}

export interface ChangeDetail {
  source: "snapshot" | "resumed" | "diff";
  changes: Change[];
  from: number;
  to: number;
  /** A snapshot replaced the whole mirror. */
  reset: boolean;
}

export interface PresenceDetail {
  members: Map<string, number>;
  join: string[];
  leave: string[];
}

export interface SignalDetail {
  user: string;
  data: Value;
}

export interface ErrorDetail {
  code: string;
  msg: string;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

export interface StateDetail {
  state: ConnectionState;
  transport: "ws" | "sse";
  attempt?: number;
  /** Milliseconds until the next attempt. */
  delay?: number;
  code?: number;
  reason?: string;
}

export interface RoomEventMap {
  change: CustomEvent<ChangeDetail>;
  presence: CustomEvent<PresenceDetail>;
  signal: CustomEvent<SignalDetail>;
  error: CustomEvent<ErrorDetail>;
}

/** A subscribed room: a live mirror of its entries. */
export class Room extends EventTarget {
  readonly id: string;
  readonly kind: "chat" | "poll" | "state" | null;
  readonly epoch: string | null;
  readonly seq: number;
  readonly entries: Map<string, Entry>;
  readonly members: Map<string, number>;
  readonly ready: boolean;
  get(key: string): Value | undefined;
  /** 0 when the key is absent (use as `if_ver` to create). */
  ver(key: string): number;
  whenReady(): Promise<Room>;
  op(op: object): Promise<number>;
  signal(data: Value): boolean;
  unsubscribe(): void;
  addEventListener<K extends keyof RoomEventMap>(
    type: K,
    listener: (ev: RoomEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | AddEventListenerOptions): void;
}

export interface ConnectOptions {
  /** User id when the server runs without auth (`?user=`). */
  user?: string;
  /** JWT when the server runs with auth. */
  token?: string;
  /** Called for a fresh token 30 s before `exp`, after a 4401 close, and before a
   * reconnect whose token has expired. */
  getToken?: () => Promise<string> | string;
  /** Default `auto`: WebSocket, falling back to SSE + HTTP when it cannot connect while
   * the server answers HTTP. */
  transport?: "auto" | "ws" | "sse";
  /** Backoff in ms: delays are uniform in [0, min(cap, base * 2^(attempt-1))]. */
  reconnect?: { base?: number; cap?: number };
}

export interface ClientEventMap {
  state: CustomEvent<StateDetail>;
  welcome: CustomEvent<Record<string, unknown>>;
  /** A token refreshed through `getToken` was accepted (`exp` in unix seconds, or null). */
  authed: CustomEvent<{ exp: number | null }>;
  error: CustomEvent<ErrorDetail>;
}

export class Client extends EventTarget {
  readonly state: ConnectionState;
  readonly transport: "ws" | "sse";
  /** The user id the server assigned (from `welcome`). */
  readonly user: string | null;
  readonly rooms: Map<string, Room>;
  /** Ops and creates not yet answered (queued while offline, in flight and re-sent on
   * reconnect, or in flight over HTTP). */
  readonly pendingOps: number;
  ready(): Promise<Client>;
  subscribe(roomId: string, options?: { presence?: boolean }): Room;
  /** Resolves to the ack's seq; rejects with RoomdError (the nack code). */
  op(roomId: string, op: object): Promise<number>;
  create(roomId: string, kind: "chat" | "poll" | "state", init?: object): Promise<number>;
  signal(roomId: string, data: Value): boolean;
  /** Drops the connection and reconnects after `delayMs` (default 0), resuming rooms. */
  reconnect(delayMs?: number): void;
  close(): void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (ev: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | AddEventListenerOptions): void;
}

export function connect(url?: string, options?: ConnectOptions): Client;
export function decodeValue(value: unknown): Value;
export function encodeValue(value: Value): unknown;
