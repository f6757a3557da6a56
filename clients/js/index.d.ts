// Type declarations for @herald/client (src/index.js). Kept by hand, matching the JS exactly.

/** A channel position: the last event held, within the channel's epoch. */
export interface Position {
  epoch: string;
  seq: number;
}

/** An `event` frame: stored events have `seq` and `epoch`; `replay` marks events sent from history. */
export interface HeraldEvent<D = unknown> {
  type: 'event';
  channel: string;
  event: string;
  data: D;
  id?: string;
  seq?: number;
  epoch?: string;
  from?: string;
  ts: number;
  replay?: boolean;
  [field: string]: unknown;
}

export interface Announcement extends HeraldEvent<{
  id: string; title: string; body: string | null; url: string | null; image: string | null;
  expires: number; audience: Record<string, unknown>;
}> {}

/** `connected.sync`: unread counts per room and the announcements not seen yet. */
export interface Sync {
  unread: Record<string, number>;
  announcements: Announcement[];
}

/** The `connected` frame (for SSE the client makes `{transport: "sse"}`). */
export interface Connected {
  type: 'connected';
  conn: string;
  user: string;
  device: string;
  node: string;
  channels: Record<string, Position>;
  sync: Sync;
  /** How often (ms) the server sends on this session's `typing` in one room. */
  typing_interval: number;
  format?: string;
  ref?: number | string;
}

export interface BackoffOptions {
  /** First delay, ms (default 1000). */
  initial?: number;
  /** Longest delay, ms (default 30000). */
  max?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** ± fraction of randomness (default 0.2). */
  jitter?: number;
  /** A session that lasted this long (ms) starts the backoff over (default 10000). */
  resetAfter?: number;
}

export interface ConnectOptions {
  /** herald's base URL: `http(s)://host:port` (or `ws(s)://`). */
  url: string;
  /** A client JWT. Without `getToken`, a 4002 (expired) stops the client. */
  token?: string;
  /** Returns a token: called for the first connection and after a 4002 (`refresh: true`). */
  getToken?: (info: { refresh: boolean }) => string | Promise<string>;
  /** `auto` (default): WebSocket, falling back to SSE when it cannot open; or one of them only. */
  transport?: 'auto' | 'ws' | 'sse';
  /** Failed WebSocket opens in a row before `auto` falls back to SSE (default 2). */
  fallbackAfter?: number;
  /** The device id of this install; sent on every connection. */
  device?: string;
  platform?: 'web' | 'ios' | 'android' | 'desktop';
  /** The app state at connect (default: from `document.visibilityState`, when there is one). */
  state?: 'foreground' | 'background';
  /** Send `state` on `visibilitychange` (default true in browsers). */
  visibility?: boolean;
  backoff?: BackoffOptions;
  /** Idle time (ms, nothing received) before a `ping` (default 25000; 0: never). */
  pingInterval?: number;
  /** No answer to that ping within this (ms): the connection is taken as lost (default 10000). */
  pongTimeout?: number;
  /** Longest wait for an op's reply, queued time included (ms, default 30000). */
  opTimeout?: number;
  /**
   * `'compact'` asks the server for compact event frames (arrays, about half the bytes of a small
   * event); the app sees the same event objects, without `id`. Default `'full'`. WebSocket only.
   */
  format?: 'full' | 'compact';
  /** Least time between two `typing` ops per room (ms; default: the server's `typing_interval`, else 1000). */
  typingInterval?: number;
  /** Ack stored events once the app's handlers returned (default true). */
  autoAck?: boolean;
  /** Acks are gathered over this long (ms, default 50). */
  ackDelay?: number;
  /** A WebSocket constructor (default: the global one; in Node 20 pass the `ws` package's). */
  WebSocket?: unknown;
  /** An EventSource constructor (default: the global one, else FetchEventSource). */
  EventSource?: unknown;
}

export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface ConnectionChange {
  state: ConnectionState;
  code?: number;
  reason?: string;
  /** ms until the next attempt (state `reconnecting`). */
  delay?: number;
}

export interface Disconnected {
  code: number;
  reason: string;
  reconnect: boolean;
  delay?: number;
}

/** The one event that says: this channel's history cannot be served, refetch it from your backend. */
export interface Refetch {
  channel: string;
  reason: 'not_recovered' | 'reset' | 'gap_not_recovered';
  /** The position to carry on from. */
  epoch: string;
  seq: number;
  previous: Position | null;
}

/** Seqs a live gap could not be filled with (its `history` call failed or was refused). */
export interface Gap {
  channel: string;
  from: number;
  to: number;
}

export interface PresenceDevice {
  device: string;
  platform: string | null;
  state: 'foreground' | 'background';
}

export interface Presence {
  user: string;
  online: boolean;
  status?: string;
  text?: string | null;
  devices: PresenceDevice[];
  last_seen: number | null;
}

export interface PresenceChanged extends Presence {
  type: 'presence.changed';
}

export interface PresenceUpdate {
  type: 'presence.update';
  room: string;
  change: 'joined' | 'left' | 'online';
  user?: string;
  users?: string[];
  more?: number;
}

interface ReplyBase {
  type: 'reply';
  ref: number;
  ok: true;
}

export interface Delivery {
  channel: string;
  seq?: number;
  epoch?: string;
}

export interface SubscribeReply extends ReplyBase {
  channel: string;
  epoch?: string;
  seq?: number;
  recovered: boolean;
}
export interface UnsubscribeReply extends ReplyBase { channel: string; subscribed: boolean; was_subscribed: boolean }
export interface PublishReply extends ReplyBase {
  id: string;
  deliveries: Delivery[];
  push: { planned: number };
  /** The event's seq in the channel published to (undefined when that channel stores nothing). */
  seq?: number;
  epoch?: string;
  idempotency_key: string;
}
export interface AckReply extends ReplyBase { channel: string; seq: number }
export interface ReadReply extends ReplyBase { room: string; seq: number; unread: number }
export interface FocusReply extends ReplyBase { room: string; focused: boolean }
export interface TypingResult { room: string; sent: boolean }
export interface StatusReply extends ReplyBase { status: string; text: string | null }
export interface StateReply { state: 'foreground' | 'background' }
export interface PresenceReply extends ReplyBase { presence: Record<string, Presence> }
export interface WatchReply extends ReplyBase { users: string[]; presence: Record<string, Presence> }
export interface UnwatchReply extends ReplyBase { users: string[] }
export interface HistoryReply extends ReplyBase {
  channel: string;
  epoch: string;
  seq: number;
  events: HeraldEvent[];
  recovered: boolean;
}
export interface LeaveReply extends ReplyBase { room: string; user: string; left: boolean; deliveries: Delivery[] }
export interface Pong { type: 'pong'; ref: number }

export interface HistoryQuery {
  channel: string;
  from?: number;
  to?: number;
  limit?: number;
}

type Listener<T> = (value: T) => unknown;

export class Emitter<Events extends Record<string, unknown>> {
  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof Events & string>(name: K, fn: Listener<Events[K]>): () => void;
  once<K extends keyof Events & string>(name: K, fn: Listener<Events[K]>): () => void;
  off<K extends keyof Events & string>(name: K, fn: Listener<Events[K]>): void;
}

export interface SubscriptionEvents {
  /** Events in seq order, each once. A handler may return a promise: the ack waits for it. */
  event: HeraldEvent;
  refetch: Refetch;
  /** SSE only: seqs that were not delivered live (SSE has no history op to fill them). */
  gap: Gap;
  presence: PresenceUpdate;
  subscribed: SubscribeReply;
  left: { room: string; user?: string; reason?: string };
  error: HeraldError;
  [name: string]: unknown;
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  state: 'pending' | 'active' | 'failed' | 'closed';
  /** The last position handed out (or skipped as this client's own publish). */
  position: Position | null;
  /** The first subscribe reply; rejects with a HeraldError when refused. */
  ready: Promise<SubscribeReply>;
  unsubscribe(): Promise<UnsubscribeReply | { channel: string; subscribed: false }>;
}

export interface ClientEvents {
  connection: ConnectionChange;
  connected: Connected;
  disconnected: Disconnected;
  closed: { code: number; reason: string };
  /** The server's `disconnect` frame, before it closes. */
  disconnect: { type: 'disconnect'; code: number; reason: string; reconnect: boolean };
  sync: Sync;
  /** Every event of every channel, in seq order per channel. */
  event: HeraldEvent;
  refetch: Refetch;
  typing: { room: string; user: string };
  read: { room: string; user?: string; seq: number; unread?: number };
  presence: PresenceChanged;
  'presence.update': PresenceUpdate;
  fallback: { transport: 'sse'; code: number; reason: string };
  error: unknown;
  [name: string]: unknown;
}

export class Client extends Emitter<ClientEvents> {
  constructor(options: ConnectOptions);
  readonly options: ConnectOptions;
  transport: 'ws' | 'sse';
  connectionState: ConnectionState;
  /** The last `connected` frame. */
  session: Connected | { transport: 'sse' } | null;
  device: string | undefined;
  appState: 'foreground' | 'background' | undefined;
  ready(): Promise<Connected | { transport: 'sse' }>;
  subscribe(channel: string, options?: { since?: Position }): Subscription;
  subscription(channel: string): Subscription | undefined;
  publish<D = unknown>(channel: string, event: string, data?: D, options?: { idempotencyKey?: string }): Promise<PublishReply>;
  ack(channel: string, seq: number): Promise<AckReply>;
  read(room: string, seq: number): Promise<ReadReply>;
  focus(room: string): Promise<FocusReply>;
  blur(room: string): Promise<FocusReply>;
  typing(room: string): Promise<TypingResult>;
  status(status: 'online' | 'away' | 'busy' | 'dnd', text?: string): Promise<StatusReply>;
  state(state: 'foreground' | 'background'): Promise<StateReply>;
  presence(users: string[]): Promise<PresenceReply>;
  watch(users: string[]): Promise<WatchReply>;
  unwatch(users: string[]): Promise<UnwatchReply>;
  /** Stored events; over the SSE transport it is an HTTP request (`GET /history`). */
  history(query: HistoryQuery): Promise<HistoryReply>;
  leave(room: string): Promise<LeaveReply>;
  ping(): Promise<Pong>;
  close(): void;
}

export class HeraldError extends Error {
  constructor(code: string, message: string, extra?: { action?: string; reply?: object });
  /** The server's error code, or the client's: `timeout`, `closed`, `disconnected`, `receive_only`. */
  code: string;
  /** `"rollback"` on a failed publish: remove the optimistic message. */
  action?: string;
  reply?: object;
}

export class Backoff {
  constructor(options?: BackoffOptions);
  initial: number;
  max: number;
  factor: number;
  jitter: number;
  resetAfter: number;
  attempt: number;
  next(random?: () => number): number;
  reset(): void;
}

export function closePolicy(code: number): { action: 'stop' | 'refresh' | 'backoff'; why?: string };

/** An EventSource over fetch (for Node 20), with request headers and `onevent` for every event. */
export class FetchEventSource {
  static readonly CONNECTING: 0;
  static readonly OPEN: 1;
  static readonly CLOSED: 2;
  constructor(url: string, init?: { headers?: Record<string, string>; fetch?: typeof fetch });
  readonly url: string;
  readyState: 0 | 1 | 2;
  lastEventId: string;
  status: number | null;
  onopen: ((ev: { type: 'open' }) => void) | null;
  onmessage: ((ev: { type: string; data: string; lastEventId: string }) => void) | null;
  onerror: ((ev: { type: 'error'; error: unknown; status: number | null }) => void) | null;
  onevent: ((type: string, ev: { type: string; data: string; lastEventId: string }) => void) | null;
  addEventListener(type: string, fn: (ev: { type: string; data: string; lastEventId: string }) => void): void;
  removeEventListener(type: string, fn: (ev: { type: string; data: string; lastEventId: string }) => void): void;
  close(): void;
}

/** Connects and keeps the connection (see ConnectOptions and the README's reconnect policy). */
export function connect(options: ConnectOptions): Client;
