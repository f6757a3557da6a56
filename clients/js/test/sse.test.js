// The SSE transport (receive-only), with the library's fetch EventSource in Node: explicit use,
// a resume from the cursor after the network drops, and the fallback when the WebSocket cannot
// open (herald refuses the upgrade: its Origin allowlist does not list ours).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../src/index.js';
import {
  api, cleanup, collect, FAST, publishMany, startHerald, startRelay, token, waitFor, WebSocket,
} from './helpers.js';

let herald;
let relay;
const clients = [];

const seqs = (events) => events.filter((e) => e.seq !== undefined).map((e) => e.seq);
const contiguous = (list, from, to) => list.length === to - from + 1 && list.every((s, i) => s === from + i);

before(async () => {
  herald = await startHerald({ env: { HERALD_WS_ORIGINS: 'http://app.example' } });
  relay = await startRelay(herald);
  for (const r of ['r1', 'r2']) {
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
