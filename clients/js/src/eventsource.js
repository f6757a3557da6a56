// A minimal EventSource over `fetch`, for runtimes without one (Node 20): the same events and
// fields a browser's EventSource gives (`open`, `message` and named events, `error`, `readyState`,
// `lastEventId`), plus what a browser's cannot do: request headers (`Authorization`,
// `Last-Event-ID`) and `onevent`, one callback for every event whatever its name.
//
// It does not reconnect by itself: when the stream ends or fails it moves to CLOSED and fires
// `error`; herald's SSE transport reconnects with its own backoff and the last cursor.

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 2;

export class FetchEventSource {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSED = CLOSED;

  /**
   * @param {string} url
   * @param {{headers?: Record<string, string>, fetch?: typeof fetch}} [init]
   */
  constructor(url, init = {}) {
    this.url = url;
    this.readyState = CONNECTING;
    this.lastEventId = init.headers?.['Last-Event-ID'] ?? '';
    /** @type {number | null} the HTTP status of a refused stream */
    this.status = null;
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    /** @type {((type: string, event: {type: string, data: string, lastEventId: string}) => void) | null} */
    this.onevent = null;
    this._listeners = new Map();
    this._abort = new AbortController();
    this._run(init.fetch ?? globalThis.fetch, init.headers ?? {});
  }

  addEventListener(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
  }

  removeEventListener(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  close() {
    this.readyState = CLOSED;
    this._abort.abort();
  }

  _dispatch(type, event) {
    if (this.readyState === CLOSED && type !== 'error') return;
    const handler = this['on' + type];
    if (typeof handler === 'function') handler.call(this, event);
    for (const fn of this._listeners.get(type) ?? []) fn.call(this, event);
  }

  async _run(fetchFn, headers) {
    try {
      const res = await fetchFn(this.url, {
        headers: { Accept: 'text/event-stream', ...headers },
        signal: this._abort.signal,
        cache: 'no-store',
      });
      this.status = res.status;
      if (!res.ok || !res.body) {
        await res.text().catch(() => {});
        throw new Error(`event stream refused: HTTP ${res.status}`);
      }
      this.readyState = OPEN;
      this._dispatch('open', { type: 'open' });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      let ev = { data: [], type: '', id: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let nl;
        while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + (buf[nl] === '\r' && buf[nl + 1] === '\n' ? 2 : 1));
          if (line === '') {
            if (ev.id !== null) this.lastEventId = ev.id;
            if (ev.data.length) {
              const type = ev.type || 'message';
              const event = { type, data: ev.data.join('\n'), lastEventId: this.lastEventId };
              this.onevent?.(type, event);
              this._dispatch(type, event);
            }
            ev = { data: [], type: '', id: null };
            continue;
          }
          if (line.startsWith(':')) continue;
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? '' : line.slice(colon + 1);
          if (val.startsWith(' ')) val = val.slice(1);
          if (field === 'data') ev.data.push(val);
          else if (field === 'event') ev.type = val;
          else if (field === 'id' && !val.includes('\0')) ev.id = val;
        }
      }
      throw new Error('event stream ended');
    } catch (err) {
      if (this.readyState === CLOSED) return;
      this.readyState = CLOSED;
      this._dispatch('error', { type: 'error', error: err, status: this.status });
    }
  }
}
