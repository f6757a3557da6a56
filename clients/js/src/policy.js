// What to do when a WebSocket closes, by close code (protocol.md, "Close codes").

/** Close codes after which the client stops: reconnecting cannot help until the app acts. */
const STOP = new Map([
  [4001, 'unauthorized: get a valid token before connecting again'],
  [4003, 'forbidden'],
  [4012, 'disconnected by the server (the backend asked for it)'],
]);

/**
 * The reconnect decision for a close code.
 *
 * - `stop`: 4001 (refused token), 4003 (forbidden), 4012 (the backend disconnected the user).
 * - `refresh`: 4002 (token expired): fetch a fresh token through `getToken`, then reconnect at once
 *   (with backoff when it happens again before a session opens). Without `getToken`, stop.
 * - `backoff`: everything else — 4008 (slow consumer), 4009 (too many connections), 4010 (bad
 *   frames), 4011 (heartbeat timeout), 1001 (node shutdown), 1006 (network loss, no close frame),
 *   1011/1013 (server or backend trouble) and any code not listed.
 *
 * @param {number} code
 * @returns {{action: 'stop' | 'refresh' | 'backoff', why?: string}}
 */
export function closePolicy(code) {
  if (STOP.has(code)) return { action: 'stop', why: STOP.get(code) };
  if (code === 4002) return { action: 'refresh' };
  return { action: 'backoff' };
}
