// The client: one connection to herald kept open (WebSocket, or SSE for receive-only use), the
// subscriptions it resumes after every reconnect, and the ops as methods with typed replies.
//
// Connection lifecycle (`client.connectionState`): `connecting` → `connected` → (`reconnecting` →
// `connected`)* → `closed`. What a close means is decided by `closePolicy` (policy.js).

import { Backoff } from './backoff.js';
import { Emitter } from './emitter.js';
import { HeraldError } from './errors.js';
import { closePolicy } from './policy.js';
import { openStream } from './sse.js';
import { isStoredKind, Subscription } from './subscription.js';
import { openSocket } from './ws.js';

/** Ops that may be sent again after a reconnect when their reply was lost (publish has its key). */
const RESENDABLE = new Set([
  'publish', 'read', 'focus', 'blur', 'status', 'state', 'presence', 'watch', 'unwatch', 'history',
]);

function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `k-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function appVisibilityState() {
  if (typeof document === 'undefined' || !document.visibilityState) return undefined;
  return document.visibilityState === 'hidden' ? 'background' : 'foreground';
}

export class Client extends Emitter {
  /** @param {import('../index.js').ConnectOptions} options */
  constructor(options) {
    super();
    if (!options || typeof options.url !== 'string') throw new TypeError('connect: `url` is required');
    if (!options.token && typeof options.getToken !== 'function') {
      throw new TypeError('connect: `token` or `getToken` is required');
    }
    this.options = options;
    const base = options.url.replace(/\/+$/, '');
    this._httpBase = base.replace(/^ws(s?):/, 'http$1:');
    this._wsUrl = base.replace(/^http(s?):/, 'ws$1:') + '/ws';
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (![undefined, 'full', 'compact'].includes(options.format)) {
      throw new TypeError("connect: `format` is 'full' or 'compact'");
    }
    this._compact = options.format === 'compact';
    /** @type {'ws' | 'sse'} */
    this.transport = options.transport === 'sse' || !this._WebSocket ? 'sse' : 'ws';
    this._fallback = options.transport === undefined || options.transport === 'auto';
    this._backoff = new Backoff(options.backoff);
    this._opTimeout = options.opTimeout ?? 30000;
    this._pingInterval = options.pingInterval ?? 25000;
    this._pongTimeout = options.pongTimeout ?? 10000;
    this._typingInterval = options.typingInterval; // else the server's (`connected.typing_interval`)
    this._ackDelay = options.ackDelay ?? 50;
    this._autoAck = options.autoAck !== false;
    /** @type {'connecting' | 'connected' | 'reconnecting' | 'closed'} */
    this.connectionState = 'connecting';
    /** @type {any} the last `connected` frame */
    this.session = null;
    /** @type {string | undefined} */
    this.device = options.device;
    /** @type {'foreground' | 'background' | undefined} */
    this.appState = options.state ?? appVisibilityState();
    /** @type {Map<string, Subscription>} */
    this._subs = new Map();
    /** @type {Map<number, any>} ops waiting for a reply, or for a connection to be sent on */
    this._pending = new Map();
    this._nextRef = 1;
    this._token = options.token;
    this._freshToken = false;
    this._refreshedWithoutSession = false;
    this._failedOpens = 0;
    this._conn = null;
    this._sse = null;
    this._sseCursor = '';
    this._sseChannels = '';
    this._timers = { retry: null, idle: null, pong: null, stable: null };
    /** @type {Set<string>} rooms focused, re-sent after a reconnect */
    this._focused = new Set();
    /** @type {Set<string>} users watched, re-sent after a reconnect */
    this._watched = new Set();
    /** @type {Map<string, number>} */
    this._typingAt = new Map();
    /** @type {Map<string, Set<Promise<unknown>>>} publishes waiting for their reply, per channel */
    this._publishing = new Map();
    /** @type {Map<string, {handled: number, acked: number, chain: Promise<void> | null, timer: any}>} */
    this._acks = new Map();
    this._onVisibility = null;
    if (options.visibility !== false && typeof document !== 'undefined' && document.addEventListener) {
      this._onVisibility = () => {
        const s = appVisibilityState();
        if (s && s !== this.appState) this.state(s).catch(() => {});
      };
      document.addEventListener('visibilitychange', this._onVisibility);
    }
    queueMicrotask(() => this._open());
  }

  // ---- public API ----------------------------------------------------------------------------

  /**
   * Resolves once the client is connected (at once when it is).
   * @returns {Promise<any>} the `connected` frame (for SSE: `{transport: "sse"}`)
   */
  ready() {
    if (this.connectionState === 'connected') return Promise.resolve(this.session);
    if (this.connectionState === 'closed') return Promise.reject(new HeraldError('closed', 'the client is closed'));
    return new Promise((resolve, reject) => {
      const offs = [
        this.once('connected', (s) => { offs.forEach((f) => f()); resolve(s); }),
        this.once('closed', (c) => { offs.forEach((f) => f()); reject(new HeraldError('closed', `closed: ${c.code} ${c.reason}`)); }),
      ];
    });
  }

  /**
   * Subscribes to a channel (or returns the subscription already made for it). The subscription
   * is resumed with `since` after every reconnect.
   * @param {string} channel
   * @param {{since?: {epoch: string, seq: number}}} [options]
   * @returns {Subscription}
   */
  subscribe(channel, options = {}) {
    let sub = this._subs.get(channel);
    if (sub && sub.state !== 'closed' && sub.state !== 'failed') {
      sub._wanted = true;
      if (sub._implicit && this.transport === 'ws' && !sub._subscribing) this._sendSubscribe(sub);
      return sub;
    }
    sub = new Subscription(this, channel, options.since);
    this._subs.set(channel, sub);
    if (this.connectionState === 'connected') {
      if (this.transport === 'ws') this._sendSubscribe(sub);
      else this._reopenStream();
    }
    return sub;
  }

  /** The subscription for `channel`, if any (`user:{me}` and `global` have one once connected). */
  subscription(channel) {
    return this._subs.get(channel);
  }

  /**
   * Publishes an event. Resolves with the reply plus the `seq` and `epoch` it got in `channel`;
   * rejects with a HeraldError whose `action` is `"rollback"` when the optimistic message must go.
   * @param {string} channel
   * @param {string} event
   * @param {unknown} [data]
   * @param {{idempotencyKey?: string}} [options]
   */
  publish(channel, event, data, options = {}) {
    const frame = { op: 'publish', channel, event, idempotency_key: options.idempotencyKey ?? randomKey() };
    if (data !== undefined) frame.data = data;
    const p = this._request(frame).then((reply) => {
      const mine = reply.deliveries?.find((d) => d.channel === channel) ?? reply.deliveries?.[0];
      for (const d of reply.deliveries ?? []) {
        if (d.seq !== undefined) this._subs.get(d.channel)?._markOwn(d.epoch, d.seq);
      }
      return { ...reply, seq: mine?.seq, epoch: mine?.epoch, idempotency_key: frame.idempotency_key };
    });
    let set = this._publishing.get(channel);
    if (!set) this._publishing.set(channel, (set = new Set()));
    const settled = p.then(() => {}, () => {});
    set.add(settled);
    settled.then(() => set.delete(settled));
    return p;
  }

  /** Acknowledges the channel's events up to `seq` (done for you unless `autoAck: false`). */
  ack(channel, seq) {
    return this._request({ op: 'ack', channel, seq });
  }

  /** Marks `room` read up to `seq`: `{room, seq, unread}`. */
  read(room, seq) {
    return this._request({ op: 'read', room, seq });
  }

  /** The room is on screen: `{room, focused: true}`; re-sent after reconnects until `blur`. */
  focus(room) {
    this._focused.add(room);
    return this._request({ op: 'focus', room });
  }

  /** The room left the screen: `{room, focused: false}`. */
  blur(room) {
    this._focused.delete(room);
    return this._request({ op: 'blur', room });
  }

  /**
   * Tells the room's active viewers this user is typing, at most once per `typingInterval` per
   * room (by default the server's: what it would coalesce anyway). Resolves `{room, sent}`: `sent`
   * is false when throttled, coalesced by the server, or not connected.
   * @param {string} room
   */
  typing(room) {
    const now = Date.now();
    const last = this._typingAt.get(room);
    const interval = this._typingInterval ?? this.session?.typing_interval ?? 1000;
    if (last !== undefined && now - last < interval) return Promise.resolve({ room, sent: false });
    if (this.connectionState !== 'connected' || this.transport !== 'ws') return Promise.resolve({ room, sent: false });
    this._typingAt.set(room, now);
    return this._request({ op: 'typing', room }, { resend: false }).then((r) => ({ room: r.room, sent: r.sent !== false }));
  }

  /** Sets the custom status (`online`, `away`, `busy`, `dnd`) and its text. */
  status(status, text) {
    const frame = { op: 'status', status };
    if (text !== undefined) frame.text = text;
    return this._request(frame);
  }

  /** This device is in the `foreground` or the `background` (kept and sent on every connect). */
  state(state) {
    this.appState = state;
    if (this.transport !== 'ws') return Promise.resolve({ state });
    return this._request({ op: 'state', state });
  }

  /** The presence of up to 1,000 users: `{presence: {user: …}}`. */
  presence(users) {
    return this._request({ op: 'presence', users });
  }

  /** Receive these users' `presence.changed` (re-sent after reconnects): `{users, presence}`. */
  watch(users) {
    users.forEach((u) => this._watched.add(u));
    return this._request({ op: 'watch', users });
  }

  /** Stop receiving these users' presence: `{users}`. */
  unwatch(users) {
    users.forEach((u) => this._watched.delete(u));
    return this._request({ op: 'unwatch', users });
  }

  /**
   * Stored events `from <= seq <= to`: `{channel, epoch, seq, events, recovered}`.
   * @param {{channel: string, from?: number, to?: number, limit?: number}} query
   */
  history(query) {
    if (this.transport === 'sse' && !this._isClosed()) return this._httpHistory(query);
    return this._request({ op: 'history', ...query });
  }

  /** The `history` op's HTTP twin (`GET /history`), for the SSE transport, which has no ops. */
  async _httpHistory({ channel, from, to, limit }) {
    const q = new URLSearchParams({ channel });
    for (const [k, v] of Object.entries({ from, to, limit })) if (v !== undefined) q.set(k, String(v));
    const token = await this._getToken();
    let res;
    try {
      res = await globalThis.fetch(`${this._httpBase}/history?${q}`, {
        headers: { Authorization: `Bearer ${token}` }, // never in the URL
        signal: AbortSignal.timeout(this._opTimeout),
      });
    } catch (err) {
      throw new HeraldError(err?.name === 'TimeoutError' ? 'timeout' : 'network', `history: ${err?.message ?? err}`);
    }
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw HeraldError.fromReply(body, `history: HTTP ${res.status}`);
    return body;
  }

  /** The atomic leave of a room: `{room, user, left, deliveries}`. */
  leave(room) {
    const sub = this._subs.get(`room:${room}`);
    return this._request({ op: 'leave', room }, { resend: false }).then((r) => {
      if (sub) { sub.state = 'closed'; sub._wanted = false; sub.emit('left', { room, reason: 'leave' }); }
      return r;
    });
  }

  /** A round trip to the server: resolves with the `pong` frame. */
  ping() {
    return this._request({ op: 'ping' }, { resend: false });
  }

  /** Closes the connection for good: no reconnect; pending ops reject with `closed`. */
  close() {
    if (this.connectionState === 'closed') return;
    this._stop(1000, 'closed by the client');
  }

  // ---- requests ------------------------------------------------------------------------------

  /**
   * Sends a frame with a fresh `ref` and resolves with its reply. While not connected the frame
   * waits, and is sent once connected; a frame whose reply was lost with the connection is sent
   * again when `resend` (the default for RESENDABLE ops), or rejected with `disconnected`.
   */
  _request(frame, { resend = RESENDABLE.has(frame.op), internal = false, onReply } = {}) {
    if (this.connectionState === 'closed') return Promise.reject(new HeraldError('closed', 'the client is closed'));
    if (this.transport !== 'ws') {
      return Promise.reject(new HeraldError('receive_only', `${frame.op}: the SSE transport only receives`));
    }
    const ref = this._nextRef++;
    return new Promise((resolve, reject) => {
      const entry = { frame: { ...frame, ref }, resolve, reject, resend, internal, onReply, sent: false, timer: null };
      entry.timer = setTimeout(() => {
        this._pending.delete(ref);
        const publish = frame.op === 'publish';
        if (publish && entry.sent) reject(new HeraldError('outcome_unknown', 'publish: no reply in time; retry with the same idempotency key'));
        else reject(new HeraldError('timeout', `${frame.op}: no reply in ${this._opTimeout} ms`, publish ? { action: 'rollback' } : {}));
      }, this._opTimeout);
      this._pending.set(ref, entry);
      if (this.connectionState === 'connected') this._sendEntry(entry);
    });
  }

  _sendEntry(entry) {
    entry.sent = Boolean(this._conn?.send(entry.frame));
  }

  _settle(reply) {
    const entry = this._pending.get(reply.ref);
    if (!entry) return;
    this._pending.delete(reply.ref);
    clearTimeout(entry.timer);
    if (reply.type === 'pong' || reply.ok) {
      entry.onReply?.(reply);
      entry.resolve(reply);
    } else {
      entry.reject(HeraldError.fromReply(reply, 'request failed'));
    }
  }

  _sendSubscribe(sub) {
    const frame = sub._subscribeFrame();
    sub._subscribing = true;
    // The reply is taken in as it is read, before the frames after it (its replay, then live
    // events), which may be read in the same turn, before any promise callback could run.
    const onReply = (reply) => sub._onSubscribed(reply, Boolean(frame.since));
    this._request(frame, { resend: false, internal: true, onReply }).catch((err) => {
      sub._subscribing = false;
      if (!['disconnected', 'closed', 'timeout'].includes(err.code)) sub._onRefused(err);
    });
  }

  _unsubscribe(sub) {
    this._subs.delete(sub.channel);
    if (this.transport !== 'ws') {
      this._reopenStream();
      return Promise.resolve({ channel: sub.channel, subscribed: false });
    }
    return this._request({ op: 'unsubscribe', channel: sub.channel });
  }

  /** Resolves when no publish to `channel` is waiting for its reply. */
  _publishesSettled(channel) {
    return Promise.all([...(this._publishing.get(channel) ?? [])]);
  }

  // ---- acks ----------------------------------------------------------------------------------

  /** The app's handlers for `seq` returned (their promises settled): ack up to it, once. */
  _handled(sub, seq, results) {
    if (!this._autoAck || this.transport !== 'ws' || !isStoredKind(sub.channel)) return;
    let st = this._acks.get(sub.channel);
    if (!st) this._acks.set(sub.channel, (st = { handled: 0, acked: 0, chain: null, timer: null }));
    const waits = results.filter((r) => r && typeof r.then === 'function');
    const done = () => {
      if (seq > st.handled) st.handled = seq;
      this._flushAckSoon(sub.channel, st);
    };
    if (waits.length === 0 && !st.chain) done();
    else {
      const chain = (st.chain ?? Promise.resolve()).then(() => Promise.allSettled(waits)).then(done);
      st.chain = chain;
      chain.then(() => { if (st.chain === chain) st.chain = null; });
    }
  }

  _flushAckSoon(channel, st) {
    if (st.timer) return;
    st.timer = setTimeout(() => {
      st.timer = null;
      if (st.handled <= st.acked || this.connectionState !== 'connected') return;
      const seq = st.handled;
      st.acked = seq;
      this._request({ op: 'ack', channel, seq }, { resend: false, internal: true }).catch((err) => {
        if (err.code === 'disconnected' && st.acked === seq) st.acked = 0; // re-sent after the resume
      });
    }, this._ackDelay);
  }

  // ---- connection ----------------------------------------------------------------------------

  async _open() {
    if (this.connectionState === 'closed') return;
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      this.emit('error', err);
      this._retry({ code: 0, reason: 'getToken failed' }, this._backoff.next());
      return;
    }
    if (this._isClosed()) return; // closed while the token was fetched
    if (this.transport === 'sse') {
      this._openSse(token);
      return;
    }
    const connectFrame = { op: 'connect', token, ref: 0 };
    if (this.device) connectFrame.device = this.device;
    if (this.options.platform) connectFrame.platform = this.options.platform;
    if (this.appState) connectFrame.state = this.appState;
    if (this._compact) connectFrame.format = 'compact';
    this._conn = openSocket({
      url: this._wsUrl,
      WebSocket: this._WebSocket,
      connectFrame,
      onFrame: (f) => this._onFrame(f),
      onClose: (info) => this._onSocketClosed(info),
    });
  }

  _isClosed() {
    return this.connectionState === 'closed';
  }

  async _getToken() {
    if (this.options.getToken && (this._freshToken || !this._token)) {
      this._token = await this.options.getToken({ refresh: this._freshToken });
      this._freshToken = false;
    }
    return this._token;
  }

  _onFrame(frame) {
    this._touch();
    switch (frame.type) {
      case 'connected':
        return this._onConnected(frame);
      case 'reply':
      case 'pong':
        return this._settle(frame);
      case 'event':
        return this._onEvent(frame);
      case 'reset':
        this._subs.get(frame.channel)?._onReset(frame);
        return;
      case 'presence.changed':
        this.emit('presence', frame);
        return;
      case 'presence.update':
        this._subs.get(`room:${frame.room}`)?.emit('presence', frame);
        this.emit('presence.update', frame);
        return;
      case 'disconnect':
        this.emit('disconnect', frame);
        return;
      default:
    }
  }

  _onConnected(frame) {
    this.session = frame;
    this.device = frame.device;
    this.connectionState = 'connected';
    this._failedOpens = 0;
    this._refreshedWithoutSession = false;
    clearTimeout(this._timers.stable);
    this._timers.stable = setTimeout(() => this._backoff.reset(), this._backoff.resetAfter);
    // The channels every session joins: resumed when a position is held, else started here.
    for (const [channel, pos] of Object.entries(frame.channels ?? {})) {
      let sub = this._subs.get(channel);
      if (!sub) this._subs.set(channel, (sub = new Subscription(this, channel, undefined, true)));
      if (sub.position) this._sendSubscribe(sub);
      else sub._onSubscribed({ channel, epoch: pos.epoch, seq: pos.seq, recovered: true }, false);
    }
    for (const sub of this._subs.values()) {
      if (sub._wanted && !(channelOfSession(frame, sub.channel))) this._sendSubscribe(sub);
    }
    for (const room of this._focused) this._request({ op: 'focus', room }, { resend: false, internal: true }).catch(() => {});
    if (this._watched.size) this._request({ op: 'watch', users: [...this._watched] }, { resend: false, internal: true }).catch(() => {});
    for (const entry of this._pending.values()) if (!entry.sent) this._sendEntry(entry);
    for (const [channel, st] of this._acks) if (st.handled > st.acked) this._flushAckSoon(channel, st);
    this.emit('connection', { state: 'connected' });
    this.emit('connected', frame);
    if (frame.sync) this.emit('sync', frame.sync);
  }

  _onEvent(frame) {
    const sub = this._subs.get(frame.channel);
    if (sub) sub._onEvent(frame);
    else this.emit('event', frame);
    if (frame.channel.startsWith('active:')) {
      if (frame.event === 'typing') this.emit('typing', frame.data);
      else if (frame.event === 'read') this.emit('read', frame.data);
    } else if (frame.channel.startsWith('user:') && frame.event === 'room.left' && frame.data?.room) {
      const left = this._subs.get(`room:${frame.data.room}`);
      if (left && left.state !== 'closed') {
        left.state = 'closed';
        left._wanted = false;
        this._subs.delete(left.channel);
        left.emit('left', frame.data);
      }
    }
  }

  /** Anything heard resets the idle timer; idle for `pingInterval` sends a `ping`. */
  _touch() {
    clearTimeout(this._timers.idle);
    clearTimeout(this._timers.pong);
    this._timers.pong = null;
    if (this.transport !== 'ws' || !this._pingInterval) return;
    this._timers.idle = setTimeout(() => {
      const conn = this._conn;
      this._request({ op: 'ping' }, { resend: false, internal: true }).catch(() => {});
      this._timers.pong = setTimeout(() => {
        if (this._conn === conn) conn?.drop(1006, 'no pong: network lost');
      }, this._pongTimeout);
    }, this._pingInterval);
  }

  _onSocketClosed({ code, reason, opened }) {
    this._conn = null;
    const wasConnected = this.connectionState === 'connected';
    this._disconnected();
    if (this.connectionState === 'closed') return;
    if (!opened && !wasConnected) this._failedOpens += 1;
    const policy = closePolicy(code);
    if (policy.action === 'stop' || (policy.action === 'refresh' && !this.options.getToken)) {
      this._stop(code, reason || policy.why || 'token expired');
      return;
    }
    let delay;
    if (policy.action === 'refresh') {
      this._freshToken = true;
      delay = this._refreshedWithoutSession ? this._backoff.next() : 0;
      this._refreshedWithoutSession = true;
    } else {
      delay = this._backoff.next();
    }
    const fallbackAfter = this.options.fallbackAfter ?? 2;
    if (this._fallback && !opened && this._failedOpens >= fallbackAfter) {
      // The WebSocket cannot open here (a proxy, a firewall): receive over SSE from now on.
      this.transport = 'sse';
      for (const entry of this._pending.values()) {
        clearTimeout(entry.timer);
        entry.reject(new HeraldError('receive_only', `${entry.frame.op}: fell back to SSE, which only receives`));
      }
      this._pending.clear();
      this.emit('fallback', { transport: 'sse', code, reason });
    }
    this._retry({ code, reason }, delay);
  }

  _retry({ code, reason }, delay) {
    this.connectionState = 'reconnecting';
    this.emit('connection', { state: 'reconnecting', code, reason, delay });
    this.emit('disconnected', { code, reason, reconnect: true, delay });
    clearTimeout(this._timers.retry);
    this._timers.retry = setTimeout(() => this._open(), delay);
  }

  /** The connection is gone: replies in flight are lost; what may be sent again waits. */
  _disconnected() {
    clearTimeout(this._timers.idle);
    clearTimeout(this._timers.pong);
    clearTimeout(this._timers.stable);
    for (const sub of this._subs.values()) sub._onDisconnected();
    for (const [ref, entry] of this._pending) {
      if (!entry.sent) continue;
      if (entry.resend) entry.sent = false;
      else {
        this._pending.delete(ref);
        clearTimeout(entry.timer);
        entry.reject(new HeraldError('disconnected', `${entry.frame.op}: the connection dropped before the reply`));
      }
    }
    if (this.connectionState !== 'closed') this.connectionState = 'reconnecting';
  }

  _stop(code, reason) {
    this.connectionState = 'closed';
    for (const t of Object.values(this._timers)) clearTimeout(t);
    for (const st of this._acks.values()) clearTimeout(st.timer);
    this._conn?.drop(code, reason, true);
    this._conn = null;
    this._sse?.close();
    this._sse = null;
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(new HeraldError('closed', `${entry.frame.op}: the client closed (${code} ${reason})`));
    }
    this._pending.clear();
    if (this._onVisibility) document.removeEventListener('visibilitychange', this._onVisibility);
    this.emit('connection', { state: 'closed', code, reason });
    this.emit('disconnected', { code, reason, reconnect: false });
    this.emit('closed', { code, reason });
  }

  // ---- SSE -----------------------------------------------------------------------------------

  _streamChannels() {
    return [...this._subs.values()].filter((s) => s._wanted).map((s) => s.channel).sort();
  }

  _openSse(token) {
    const channels = this._streamChannels();
    this._sseChannels = channels.join(',');
    if (channels.length === 0) {
      // Nothing to listen to yet: "connected" with no stream; `subscribe` opens one.
      this._onSseOpen();
      return;
    }
    // event_name=message: every app event arrives as `message`, so an EventSource needs no list of types.
    const q = new URLSearchParams({ channels: this._sseChannels, token, event_name: 'message' });
    if (this.device) q.set('device', this.device);
    if (this._sseCursor) q.set('last_event_id', this._sseCursor);
    this._sse = openStream({
      url: `${this._httpBase}/sse?${q}`,
      EventSource: this.options.EventSource,
      onOpen: () => this._onSseOpen(),
      onFrame: (frame, cursor) => {
        if (cursor) this._sseCursor = cursor;
        if (frame.type === 'disconnect') {
          this._sse?.close();
          this._sse = null;
          this._disconnected();
          if (frame.reconnect === false) this._stop(frame.code, frame.reason);
          else this._retry(frame, this._backoff.next());
          return;
        }
        this._onFrame(frame);
      },
      onError: ({ closed, status }) => {
        this._disconnected();
        if (!closed) {
          // The browser's EventSource reconnects by itself, with Last-Event-ID.
          this.emit('connection', { state: 'reconnecting', code: 0, reason: 'event stream lost' });
          return;
        }
        this._sse = null;
        if (status === 401) this._freshToken = Boolean(this.options.getToken);
        if (status === 401 && !this.options.getToken) this._stop(4001, 'unauthorized');
        else this._retry({ code: status ?? 0, reason: 'event stream closed' }, this._backoff.next());
      },
    });
  }

  _onSseOpen() {
    this.connectionState = 'connected';
    this.session = { transport: 'sse' };
    clearTimeout(this._timers.stable);
    this._timers.stable = setTimeout(() => this._backoff.reset(), this._backoff.resetAfter);
    for (const sub of this._subs.values()) {
      if (sub._wanted && sub.state !== 'active') sub._onSubscribed({ channel: sub.channel, recovered: true }, false);
    }
    this.emit('connection', { state: 'connected' });
    this.emit('connected', this.session);
  }

  /** The channel list changed: a new stream with it, resumed from the last cursor. */
  _reopenStream() {
    if (this.connectionState === 'closed' || this._streamChannels().join(',') === this._sseChannels) return;
    this._sse?.close();
    this._sse = null;
    this._open();
  }
}

/** True when the server joined this channel at connect (it needs no subscribe). */
function channelOfSession(frame, channel) {
  return Boolean(frame.channels && Object.prototype.hasOwnProperty.call(frame.channels, channel));
}
