// The SSE leg, for receive-only use: one EventSource on `/sse?channels=…`. The browser's
// EventSource reconnects by itself and sends `Last-Event-ID`; when it gives up (a refused stream,
// an expired token) or when the channel list changes, the client opens a new one with a fresh token
// and the last cursor in `?last_event_id=`, which replays what was missed on every channel.

import { FetchEventSource } from './eventsource.js';

/**
 * The SSE event names of the stream: the client asks for `event_name=message`, so every app event is
 * `message` whatever its type, and the protocol frames keep their own names.
 */
const NAMES = ['message', 'reset', 'disconnect', 'presence.update', 'presence.changed'];

/**
 * Opens one event stream.
 * @param {object} o
 * @param {string} o.url the /sse URL with channels, token, device, cursor and event_name=message
 * @param {any} [o.EventSource] a constructor (default: the global one, else FetchEventSource)
 * @param {() => void} o.onOpen
 * @param {(frame: any, cursor: string) => void} o.onFrame
 * @param {(info: {closed: boolean, status: number | null}) => void} o.onError `closed` when the
 *   EventSource gave up (no reconnect of its own)
 * @returns {{close(): void}}
 */
export function openStream({ url, EventSource, onOpen, onFrame, onError }) {
  const Ctor = EventSource ?? globalThis.EventSource ?? FetchEventSource;
  const es = new Ctor(url);
  let closed = false;
  const handle = (ev) => {
    if (closed) return;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (frame && typeof frame === 'object') onFrame(frame, ev.lastEventId || '');
  };
  if ('onevent' in es) es.onevent = (_type, ev) => handle(ev); // every named event at once
  else for (const t of NAMES) es.addEventListener(t, handle);
  es.onopen = () => !closed && onOpen();
  es.onerror = (ev) => {
    if (closed) return;
    const gaveUp = es.readyState === 2;
    if (gaveUp) closed = true;
    onError({ closed: gaveUp, status: ev?.status ?? es.status ?? null });
  };
  return {
    close() {
      closed = true;
      es.close();
    },
  };
}
