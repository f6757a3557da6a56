// The SSE transport (receive-only), with the library's fetch EventSource in Node: explicit use,
// a resume from the cursor after the network drops, a live gap filled over HTTP (or handed on as a
// `gap` when that fails), and the fallback when the WebSocket cannot open (herald refuses the
// upgrade: its Origin allowlist does not list ours).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../src/index.js';
import {
  api, cleanup, collect, FAST, publishMany, startHerald, startRelay, token, waitFor, WebSocket,
} from './helpers.js';

let herald;
let relay;
const clients = [];

/** A WebSocket from the one origin herald lets upgrade here (the other device's). */
class FromApp extends WebSocket {
  constructor(url) { super(url, { origin: 'http://app.example' }); }
}

const seqs = (events) => events.filter((e) => e.seq !== undefined).map((e) => e.seq);
const contiguous = (list, from, to) => list.length === to - from + 1 && list.every((s, i) => s === from + i);

before(async () => {
  herald = await startHerald({ env: { HERALD_WS_ORIGINS: 'http://app.example' } });
  relay = await startRelay(herald);
  for (const r of ['r1', 'r2', 'r3', 'r4']) {
    for (const u of ['alice', 'bob']) await api(herald.base, 'PUT', `/api/v1/rooms/${r}/members/${u}`);
  }
});

after(async () => {
  for (const c of clients) c.close();
  await relay?.close();
  await cleanup();
});

test('sse: receives in order, resumes from Last-Event-ID after a drop, refuses ops', async () => {
  const c = connect({ url: relay.base, token: token('alice'), transport: 'sse', backoff: FAST, device: 'alice-tv' });
  clients.push(c);
  assert.equal(c.transport, 'sse');
  const sub = c.subscribe('room:r1');
  const got = collect(sub);
  await c.ready();
  await waitFor(async () => (await api(herald.base, 'GET', '/api/v1/presence/alice')).online, 'the stream open (alice online)');
  await publishMany(herald.base, 'r1', 3);
  await waitFor(() => seqs(got).length === 3, 'three events over SSE');
  relay.refuse(true);
  relay.dropAll();
  await waitFor(() => c.connectionState === 'reconnecting', 'reconnecting');
  await publishMany(herald.base, 'r1', 3, 'bob', 'missed'); // 4..6
  relay.refuse(false);
  await waitFor(() => seqs(got).length === 6, 'the missed events, replayed from the cursor');
  await publishMany(herald.base, 'r1', 1, 'bob', 'live');
  await waitFor(() => seqs(got).length === 7, 'live again');
  assert.ok(contiguous(seqs(got), 1, 7), JSON.stringify(seqs(got)));
  assert.ok(got.slice(3, 6).every((e) => e.replay === true));
  await assert.rejects(c.publish('room:r1', 'chat.message', {}), (e) => e.code === 'receive_only');
});

/**
 * alice's SSE client (through the relay) subscribed to `room`, its stream open, and her other
 * device: a WebSocket client straight to herald, whose publishes her stream does not get live.
 */
async function streamAndTab(room) {
  const c = connect({ url: relay.base, token: token('alice'), transport: 'sse', backoff: FAST });
  const tab = connect({ url: herald.base, token: token('alice'), WebSocket: FromApp, transport: 'ws', backoff: FAST });
  clients.push(c, tab);
  const sub = c.subscribe(`room:${room}`);
  const got = collect(sub);
  const gaps = collect(sub, 'gap');
  const errors = collect(sub, 'error');
  await Promise.all([c.ready(), tab.ready()]);
  await waitFor(async () => (await api(herald.base, 'GET', `/api/v1/rooms/${room}/presence`)).users.includes('alice'), 'the stream open');
  return { c, tab, got, gaps, errors };
}

// A live gap over SSE: alice's other device publishes, so her stream skips that seq. This test
// runs before any history request of this file, so no idle pooled connection to the relay can
// carry one past `refuse`.
test('sse: a gap whose history cannot be fetched is handed on as one gap event', async () => {
  const { tab, got, gaps, errors } = await streamAndTab('r3');
  await publishMany(herald.base, 'r3', 1); // 1
  await waitFor(() => seqs(got).length === 1, 'the first event');
  relay.refuse(true); // the open stream stays; a new connection (the history request) is refused
  try {
    assert.equal((await tab.publish('room:r3', 'chat.message', { text: 'from the tab' })).seq, 2);
    await publishMany(herald.base, 'r3', 1, 'bob', 'after'); // 3
    await waitFor(() => seqs(got).length === 2, 'the event after the gap');
  } finally {
    relay.refuse(false);
  }
  assert.deepEqual(seqs(got), [1, 3]);
  assert.deepEqual(gaps, [{ channel: 'room:r3', from: 2, to: 2 }]);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 'network');
});

test('sse: a live gap is filled over HTTP (GET /history) before the next event is handed out', async () => {
  const { c, tab, got, gaps } = await streamAndTab('r4');
  await publishMany(herald.base, 'r4', 1); // 1
  assert.equal((await tab.publish('room:r4', 'chat.message', { text: 'from the tab' })).seq, 2);
  await publishMany(herald.base, 'r4', 2, 'bob', 'after'); // 3, 4
  await waitFor(() => seqs(got).length === 4, 'every event, the gap filled');
  assert.deepEqual(seqs(got), [1, 2, 3, 4]);
  assert.equal(got[1].data.text, 'from the tab');
  assert.equal(got[1].from, 'alice');
  assert.deepEqual(gaps, []);
  // And the method itself, over the SSE transport.
  const h = await c.history({ channel: 'room:r4', from: 2, to: 3 });
  assert.deepEqual(h.events.map((e) => e.seq), [2, 3]);
  await assert.rejects(c.history({ channel: 'user:bob' }), (e) => e.code === 'forbidden');
});

test('sse: a fallback when the WebSocket cannot open', async () => {
  // herald lists http://app.example as the only WebSocket origin: this socket's upgrade gets 403.
  class Elsewhere extends WebSocket {
    constructor(url) { super(url, { origin: 'http://elsewhere.example' }); }
  }
  const c = connect({ url: relay.base, token: token('alice'), WebSocket: Elsewhere, backoff: FAST });
  clients.push(c);
  const fallback = collect(c, 'fallback');
  const sub = c.subscribe('room:r2');
  const got = collect(sub);
  await waitFor(() => c.transport === 'sse' && c.connectionState === 'connected', 'the SSE fallback');
  assert.equal(fallback.length, 1);
  await waitFor(async () => (await api(herald.base, 'GET', '/api/v1/rooms/r2/presence')).users.includes('alice'),
    'alice present in r2 through the stream');
  await publishMany(herald.base, 'r2', 2);
  await waitFor(() => seqs(got).length === 2, 'events over the fallback');
  assert.deepEqual(got.map((e) => e.data.text), ['m0', 'm1']);
});

test('sse: an EventSource that dispatches by name only (as browsers do) gets every app event type', async () => {
  const { FetchEventSource } = await import('../src/index.js');
  // Like a browser's: no catch-all callback, only addEventListener(name).
  class ByName extends FetchEventSource {
    constructor(url) {
      super(url);
      delete this.onevent;
    }
  }
  const probe = new ByName('http://127.0.0.1:9/');
  probe.onerror = () => {};
  assert.ok(!('onevent' in probe), 'the catch-all is gone');
  probe.close();
  const c = connect({ url: relay.base, token: token('bob'), transport: 'sse', EventSource: ByName, backoff: FAST });
  clients.push(c);
  const sub = c.subscribe('room:r1');
  const got = collect(sub);
  await c.ready();
  await waitFor(async () => (await api(herald.base, 'GET', '/api/v1/presence/bob')).online, 'the stream open');
  for (const event of ['chat.message', 'invoice.paid', 'x:custom']) {
    await api(herald.base, 'POST', '/api/v1/events', { event, room: 'r1', data: { t: event } });
  }
  await waitFor(() => got.length >= 3, 'three events of three types');
  assert.deepEqual(got.slice(-3).map((e) => e.event), ['chat.message', 'invoice.paid', 'x:custom']);
});
