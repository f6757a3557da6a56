// One channel as the app sees it: the position held (`{epoch, seq}`), the events handed out in seq
// order, each once, and the single `refetch` event when the history cannot be served.
//
// Stored events (those with a `seq`) go through `accept`: one at or below the position is a
// duplicate (a replay overlapping live delivery) and is dropped; the next one is delivered; one
// further ahead waits in `ahead` while the gap is filled — by the replay that follows a resubscribe,
// by the publish replies of this client (its own events are not echoed back live), or else by a
// `history` call. Events that are not stored (typing, receipts) are delivered at once.

import { Emitter } from './emitter.js';
import { HeraldError } from './errors.js';

/** A channel kind the server stores (positions mean something), by the shipped channels.toml. */
export function isStoredKind(channel) {
  return !channel.startsWith('active:') && !channel.startsWith('presence:');
}

export class Subscription extends Emitter {
  /**
   * @param {import('./client.js').Client} client
   * @param {string} channel
   * @param {{epoch: string, seq: number} | undefined} since
   * @param {boolean} implicit joined by the server at connect (`user:{me}`, `global`)
   */
  constructor(client, channel, since, implicit = false) {
    super();
    /** @readonly */
    this.channel = channel;
    /** @type {'pending' | 'active' | 'failed' | 'closed'} */
    this.state = 'pending';
    /** @type {{epoch: string, seq: number} | null} the last position delivered (or skipped as own) */
    this.position = since ? { epoch: since.epoch, seq: since.seq } : null;
    this._client = client;
    this._implicit = implicit;
    this._wanted = !implicit;
    /** @type {Map<number, object>} stored events ahead of the position, by seq */
    this._ahead = new Map();
    /** @type {Set<number>} seqs this client published itself (the reply gave them) */
    this._own = new Set();
    this._replayUntil = 0;
    this._repairing = false;
    this._subscribing = false;
    /** @type {Promise<object>} */
    this.ready = new Promise((resolve, reject) => {
      this._readyResolve = resolve;
      this._readyReject = reject;
    });
    this.ready.catch(() => {}); // an app that never awaits `ready` hears of failure on 'error'
  }

  /**
   * Leaves the channel (`unsubscribe`); the subscription stops delivering at once.
   * @returns {Promise<object>} the reply `{channel, subscribed, was_subscribed}`
   */
  unsubscribe() {
    this.state = 'closed';
    this._wanted = false;
    this._ahead.clear();
    return this._client._unsubscribe(this);
  }

  // ---- called by the client ------------------------------------------------------------------

  /** The `subscribe` frame to send on this connection: `since` whenever a position is held. */
  _subscribeFrame() {
    const frame = { op: 'subscribe', channel: this.channel };
    if (this.position && isStoredKind(this.channel)) frame.since = { ...this.position };
    return frame;
  }

  /** The subscribe reply on a (new) connection. */
  _onSubscribed(reply, sentSince) {
    this._subscribing = false;
    this.state = 'active';
    if (reply.epoch !== undefined && reply.seq !== undefined) {
      if (sentSince && reply.recovered === false) {
        this._refetch('not_recovered', reply.epoch, reply.seq);
      } else if (!this.position || this.position.epoch !== reply.epoch) {
        if (this.position) this._refetch('not_recovered', reply.epoch, reply.seq);
        else this.position = { epoch: reply.epoch, seq: reply.seq };
      } else {
        // Resumed: the replay of (position, reply.seq] follows this reply.
        this._replayUntil = reply.seq;
      }
    }
    this._readyResolve(reply);
    this.emit('subscribed', reply);
    this._drain();
  }

  /** A refused subscribe: the subscription fails (it is not retried). */
  _onRefused(err) {
    this._subscribing = false;
    this.state = 'failed';
    this._wanted = false;
    this._readyReject(err);
    this.emit('error', err);
  }

  /** An `event` frame for this channel. */
  _onEvent(frame) {
    if (this.state === 'closed') return;
    if (frame.seq === undefined || frame.seq === null) {
      this._deliver(frame);
      return;
    }
    if (frame.epoch === undefined) {
      // A compact frame: it has the epoch of the position held, and the replay marker from the
      // subscribe reply's seq (what the full form would say).
      frame.epoch = this.position?.epoch;
      if (frame.seq <= this._replayUntil) frame.replay = true;
    }
    if (!this.position) {
      // No position yet (an event before the first reply): it starts the count.
      this.position = { epoch: frame.epoch, seq: frame.seq - 1 };
    } else if (frame.epoch && frame.epoch !== this.position.epoch) {
      // A new epoch without a `reset` before it: the same thing, said late.
      this._refetch('reset', frame.epoch, 0);
    }
    if (frame.seq <= this.position.seq) return; // already handed out
    this._ahead.set(frame.seq, frame);
    this._drain();
  }

  /** A `reset` frame: the channel's epoch changed under the subscription. */
  _onReset(frame) {
    if (this.state === 'closed') return;
    this._refetch('reset', frame.epoch, frame.seq ?? 0);
    this._drain();
  }

  /** This client published `seq` here: the server will not echo it, so it is no gap. */
  _markOwn(epoch, seq) {
    if (!this.position || epoch !== this.position.epoch || seq <= this.position.seq) return;
    this._own.add(seq);
    this._drain();
  }

  /** The connection dropped: a repair in flight is abandoned (the resubscribe replays instead). */
  _onDisconnected() {
    this._repairing = false;
    this._replayUntil = 0;
    if (this.state === 'active') this.state = 'pending';
  }

  // ---- ordering ------------------------------------------------------------------------------

  _refetch(reason, epoch, seq) {
    const previous = this.position;
    this.position = { epoch, seq };
    this._own.clear();
    for (const [s, f] of this._ahead) if (f.epoch !== epoch || s <= seq) this._ahead.delete(s);
    const info = { channel: this.channel, reason, epoch, seq, previous };
    this.emit('refetch', info);
    this._client.emit('refetch', info);
  }

  _drain() {
    if (!this.position) return;
    for (;;) {
      const next = this.position.seq + 1;
      const frame = this._ahead.get(next);
      if (frame) {
        this._ahead.delete(next);
        this.position = { epoch: this.position.epoch, seq: next };
        this._deliver(frame);
      } else if (this._own.delete(next)) {
        this.position = { epoch: this.position.epoch, seq: next };
      } else break;
    }
    for (const s of this._own) if (s <= this.position.seq) this._own.delete(s);
    if (this._ahead.size > 0) this._repairSoon();
  }

  /** Fills the gap before the first event waiting, unless a replay or a publish reply will. */
  _repairSoon() {
    if (this._repairing || this._subscribing || this.state !== 'active') return;
    if (this.position.seq + 1 <= this._replayUntil) return; // the replay is on its way
    this._repairing = true;
    const epoch = this.position.epoch;
    const run = async () => {
      // A publish of ours still waiting for its reply may be the missing seq: wait for it first.
      await this._client._publishesSettled(this.channel);
      if (!this._repairing || this.position.epoch !== epoch) return;
      const from = this.position.seq + 1;
      const first = Math.min(...this._ahead.keys());
      if (first <= from) return; // filled meanwhile
      const to = Math.min(first - 1, from + 999); // one history page at a time
      const reply = await this._client.history({ channel: this.channel, from, to, limit: to - from + 1 });
      if (!this._repairing || this.position.epoch !== epoch) return;
      if (reply.epoch !== epoch) {
        this._refetch('reset', reply.epoch, reply.seq);
        return;
      }
      for (const ev of reply.events) {
        if (ev.seq > this.position.seq && ev.seq <= to && !this._own.has(ev.seq)) this._ahead.set(ev.seq, ev);
      }
      let complete = reply.recovered !== false;
      for (let s = Math.max(from, this.position.seq + 1); complete && s <= to; s++) {
        if (!this._ahead.has(s) && !this._own.has(s)) complete = false;
      }
      // Some of the gap is no longer kept: say so once, and carry on after it.
      if (!complete) this._refetch('gap_not_recovered', epoch, to);
    };
    run()
      .catch((err) => {
        if (err instanceof HeraldError && ['disconnected', 'closed'].includes(err.code)) return;
        this.emit('error', err);
        // The history was refused or failed (not a lost connection, whose resubscribe replays the
        // gap): asking again at once would fail again, so hand out what came and say where the
        // hole is.
        if (this.position?.epoch === epoch) this._skipGap();
      })
      .finally(() => {
        this._repairing = false;
        if (this.state === 'active') this._drain();
      });
  }

  /** Moves past the gap before the first event waiting, with a `gap` event naming it. */
  _skipGap() {
    if (this._ahead.size === 0) return;
    const first = Math.min(...this._ahead.keys());
    if (first <= this.position.seq + 1) return;
    const gap = { channel: this.channel, from: this.position.seq + 1, to: first - 1 };
    this.position = { epoch: this.position.epoch, seq: first - 1 };
    this.emit('gap', gap);
  }

  _deliver(frame) {
    const results = [...this.emit('event', frame), ...this._client.emit('event', frame)];
    if (frame.seq !== undefined && frame.seq !== null) this._client._handled(this, frame.seq, results);
  }
}
