// The WebSocket leg: one socket, its `connect` frame, and what comes back, handed to the client.
// The token goes in the `connect` frame, never in the URL (URLs end up in proxy logs).

/**
 * Opens one WebSocket session attempt.
 * @param {object} o
 * @param {string} o.url the ws(s):// URL of /ws
 * @param {any} o.WebSocket the WebSocket constructor
 * @param {object} o.connectFrame the first frame (`op: "connect"`, token, device, state…)
 * @param {(frame: any) => void} o.onFrame every parsed server frame, `connected` included
 * @param {(info: {code: number, reason: string, opened: boolean, frame?: any}) => void} o.onClose
 *   once, when the socket is gone (or `drop` was called)
 * @returns {{send(frame: object): boolean, drop(code?: number, reason?: string, graceful?: boolean): void}}
 */
export function openSocket({ url, WebSocket, connectFrame, onFrame, onClose }) {
  let opened = false;
  let done = false;
  /** @type {any} the `disconnect` frame the server sent before closing */
  let disconnect;
  const ws = new WebSocket(url);

  const finish = (code, reason) => {
    if (done) return;
    done = true;
    ws.onopen = ws.onmessage = ws.onclose = null;
    // Not null: a socket dropped while still connecting reports that as an error afterwards, and
    // in Node (the `ws` package) an error nobody listens to is an uncaught exception.
    ws.onerror = () => {};
    onClose({ code: disconnect?.code ?? code, reason: disconnect?.reason ?? reason, opened, frame: disconnect });
  };

  ws.onopen = () => {
    opened = true;
    ws.send(JSON.stringify(connectFrame));
  };
  ws.onmessage = (ev) => {
    if (done || typeof ev.data !== 'string') return;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return; // not ours to read
    }
    if (Array.isArray(frame)) frame = expandCompact(frame);
    if (!frame || typeof frame !== 'object') return;
    if (frame.type === 'disconnect') disconnect = frame;
    onFrame(frame);
  };
  ws.onerror = () => {}; // a close always follows
  ws.onclose = (ev) => finish(ev.code || 1006, ev.reason || '');

  return {
    send(frame) {
      if (done || ws.readyState !== 1) return false;
      ws.send(JSON.stringify(frame));
      return true;
    },
    drop(code = 1006, reason = 'closed by the client', graceful = false) {
      if (done) return;
      try {
        if (!graceful && typeof ws.terminate === 'function') ws.terminate();
        else ws.close(1000);
      } catch {
        // already closing
      }
      finish(code, reason);
    },
  };
}

/**
 * A compact event frame (`[channel, seq, event, data, ts, from?]`, the session's `format:
 * "compact"`) as the event object the full form would be, less what compact leaves out: `epoch`
 * (the subscription fills it in), `id` and the `replay` marker (the subscription sets it). Not an
 * event array: `null`.
 * @param {any[]} a
 */
export function expandCompact(a) {
  if (typeof a[0] !== 'string' || typeof a[2] !== 'string') return null;
  const frame = { type: 'event', channel: a[0], event: a[2], data: a[3], ts: a[4] };
  if (typeof a[1] === 'number') frame.seq = a[1];
  if (typeof a[5] === 'string') frame.from = a[5];
  return frame;
}
