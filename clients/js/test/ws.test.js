// The client over WebSocket against a real `herald serve` on the memory backend, behind a TCP
// relay (so a test can cut the network or restart herald at the same address).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { connect, HeraldError } from '../src/index.js';
import {
  api, cleanup, collect, FAST, publishMany, recordingWebSocket, startHerald, startRelay, token, waitFor,
  WebSocket,
} from './helpers.js';

let herald;
let relay;
const clients = [];

/** A client for `user` through the relay; closed after the tests. */
function client(user, opts = {}) {
  const c = connect({ url: relay.base, token: token(user), WebSocket, backoff: FAST, ...opts });
  clients.push(c);
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Seqs of stored events, in the order handed out. */
const seqs = (events) => events.filter((e) => e.seq !== undefined).map((e) => e.seq);

/** True when `list` is exactly from..to, each once, in order. */
function contiguous(list, from, to) {
  return list.length === to - from + 1 && list.every((s, i) => s === from + i);
}

async function room(id, users) {
  for (const u of users) await api(herald.base, 'PUT', `/api/v1/rooms/${id}/members/${u}`);
}

before(async () => {
  herald = await startHerald();
  relay = await startRelay(herald);
});

after(async () => {
  for (const c of clients) c.close();
  await relay?.close();
  await cleanup();
});

test('connect: state events, the login sync as an event, and every op with its typed reply', async () => {
  await room('r1', ['alice', 'bob']);
  await api(herald.base, 'PUT', '/api/v1/users/alice/contacts', { contacts: ['bob'] });
  await publishMany(herald.base, 'r1', 2);
  const c = client('alice', { device: 'alice-laptop', platform: 'web' });
  const states = collect(c, 'connection');
  const syncs = collect(c, 'sync');
  const session = await c.ready();
  assert.equal(session.user, 'alice');
  assert.equal(session.device, 'alice-laptop');
  assert.deepEqual(states.map((s) => s.state), ['connected']);
  assert.deepEqual(syncs, [{ unread: { r1: 2 }, announcements: [] }]);
  assert.equal(c.connectionState, 'connected');

  const sub = c.subscribe('room:r1');
  const reply = await sub.ready;
  assert.equal(reply.seq, 2);
  assert.equal(reply.recovered, true);
  assert.deepEqual(sub.position, { epoch: reply.epoch, seq: 2 });

  const pub = await c.publish('room:r1', 'chat.message', { text: 'hi' });
  assert.equal(pub.seq, 3);
  assert.equal(pub.epoch, reply.epoch);
  assert.ok(pub.id && pub.idempotency_key);
  const again = await c.publish('room:r1', 'chat.message', { text: 'hi' }, { idempotencyKey: pub.idempotency_key });
  assert.equal(again.seq, 3, 'the same key stores nothing twice');
  await assert.rejects(c.publish('global', 'chat.message', {}), (e) => {
    assert.ok(e instanceof HeraldError);
    assert.equal(e.code, 'forbidden');
    assert.equal(e.action, 'rollback');
    return true;
  });

  assert.deepEqual(await c.read('r1', 3).then((r) => [r.room, r.seq, r.unread]), ['r1', 3, 0]);
  assert.equal((await c.focus('r1')).focused, true);
  assert.equal((await c.blur('r1')).focused, false);
  assert.deepEqual(await c.status('busy', 'in a meeting').then((r) => [r.status, r.text]), ['busy', 'in a meeting']);
  assert.equal((await c.state('background')).state, 'background');
  const dev = await waitFor(async () => {
    const p = await api(herald.base, 'GET', '/api/v1/presence/alice');
    return p.devices.find((d) => d.device === 'alice-laptop' && d.state === 'background') && p;
  }, 'background state in the presence API');
  assert.equal(dev.online, true);
  assert.equal((await c.presence(['bob'])).presence.bob.online, false);
  assert.deepEqual((await c.watch(['bob'])).users, ['bob']);
  const hist = await c.history({ channel: 'room:r1', from: 2 });
  assert.deepEqual(seqs(hist.events), [2, 3]);
  assert.equal((await c.ping()).type, 'pong');
  const bad = c.subscribe('room:nope');
  await assert.rejects(bad.ready, (e) => e.code === 'not_member');
  assert.equal(bad.state, 'failed');
  const left = await c.leave('r1');
  assert.equal(left.left, true);
  assert.equal(sub.state, 'closed');
  await assert.rejects(c.read('r1', 1), (e) => e.code === 'not_member');
});

test('events reach the app in seq order, each once: a live gap is repaired by history', async () => {
  // Two sessions of alice: the server does not echo a room event to any session of its sender,
  // so tab B sees a gap where tab A published; B repairs it, A skips its own seq without asking.
  await room('r2', ['alice', 'bob']);
  const a = recordingWebSocket();
  const b = recordingWebSocket();
  const tabA = client('alice', { WebSocket: a.WebSocket });
  const tabB = client('alice', { WebSocket: b.WebSocket });
  const subA = tabA.subscribe('room:r2');
  const subB = tabB.subscribe('room:r2');
  const gotA = collect(subA);
  const gotB = collect(subB);
  await Promise.all([subA.ready, subB.ready]);
  await publishMany(herald.base, 'r2', 2); // 1, 2
  const own = await tabA.publish('room:r2', 'chat.message', { text: 'from A' }); // 3
  assert.equal(own.seq, 3);
  await publishMany(herald.base, 'r2', 2); // 4, 5
  await waitFor(() => seqs(gotB).length >= 5 && seqs(gotA).length >= 4, 'both tabs to catch up');
  assert.deepEqual(seqs(gotB), [1, 2, 3, 4, 5]);
  assert.equal(gotB[2].data.text, 'from A', 'B got A\'s message, from history');
  assert.deepEqual(seqs(gotA), [1, 2, 4, 5], 'A has its own from the publish reply');
  assert.ok(b.log.sent.some((f) => f.op === 'history' && f.channel === 'room:r2' && f.from === 3 && f.to === 3));
  assert.ok(!a.log.sent.some((f) => f.op === 'history'), 'A never needed history');
  assert.deepEqual(subA.position.seq, 5);
});

test('reconnect after the network drops: resubscribe with since, no gap, no duplicate', async () => {
  await room('r3', ['alice', 'bob']);
  const rec = recordingWebSocket();
  const c = client('alice', { WebSocket: rec.WebSocket });
  const sub = c.subscribe('room:r3');
  const got = collect(sub);
  const refetch = collect(c, 'refetch');
  const states = collect(c, 'connection');
  await sub.ready;
  await publishMany(herald.base, 'r3', 3);
  await waitFor(() => seqs(got).length === 3, 'first three');
  relay.refuse(true);
  relay.dropAll();
  await waitFor(() => c.connectionState === 'reconnecting', 'reconnecting state');
  await publishMany(herald.base, 'r3', 4, 'bob', 'missed'); // 4..7, while alice is away
  relay.refuse(false);
  await waitFor(() => seqs(got).length === 7, 'the missed events');
  await publishMany(herald.base, 'r3', 1, 'bob', 'after'); // 8
  await waitFor(() => seqs(got).length === 8, 'a live event after the resume');
  assert.ok(contiguous(seqs(got), 1, 8), JSON.stringify(seqs(got)));
  assert.ok(got.slice(3, 7).every((e) => e.replay === true));
  assert.deepEqual(refetch, []);
  const resub = rec.log.sent.filter((f) => f.op === 'subscribe' && f.channel === 'room:r3');
  assert.equal(resub.length, 2);
  assert.deepEqual(resub[1].since, { epoch: sub.position.epoch, seq: 3 });
  assert.ok(rec.log.opened >= 2);
  assert.deepEqual([...new Set(states.map((s) => s.state))], ['connected', 'reconnecting']);
  assert.equal(states.at(-1).state, 'connected');
});

test('compact frames: the same events for the app, in order and once, across a gap repair and a resume', async () => {
  await room('r7', ['alice', 'bob']);
  const a = recordingWebSocket();
  const b = recordingWebSocket();
  const tabA = client('alice', { WebSocket: a.WebSocket, format: 'compact' });
  const tabB = client('alice', { WebSocket: b.WebSocket, format: 'compact' });
  const subA = tabA.subscribe('room:r7');
  const subB = tabB.subscribe('room:r7');
  const gotB = collect(subB);
  const refetch = collect(tabB, 'refetch');
  await Promise.all([subA.ready, subB.ready]);
  assert.equal(tabB.session.format, 'compact');
  await publishMany(herald.base, 'r7', 2, 'bob', 'x'); // 1, 2
  assert.equal((await tabA.publish('room:r7', 'chat.message', { text: 'from A' })).seq, 3); // a gap for B
  await publishMany(herald.base, 'r7', 1, 'bob', 'y'); // 4
  await waitFor(() => seqs(gotB).length === 4, 'B repairs the gap');
  assert.deepEqual(seqs(gotB), [1, 2, 3, 4]);
  assert.equal(gotB[2].data.text, 'from A');
  assert.ok(b.log.sent.some((f) => f.op === 'history' && f.from === 3 && f.to === 3));
  // The network drops; what is published meanwhile is replayed after the resume.
  relay.refuse(true);
  relay.dropAll();
  await waitFor(() => tabB.connectionState === 'reconnecting', 'reconnecting');
  await publishMany(herald.base, 'r7', 2, 'bob', 'missed'); // 5, 6
  relay.refuse(false);
  await waitFor(() => seqs(gotB).length === 6, 'the missed events');
  await publishMany(herald.base, 'r7', 1, 'bob', 'after'); // 7
  await waitFor(() => seqs(gotB).length === 7, 'a live event after the resume');
  assert.deepEqual(seqs(gotB), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(refetch, []);
  const epoch = subB.position.epoch;
  for (const e of gotB) {
    assert.equal(e.type, 'event');
    assert.equal(e.channel, 'room:r7');
    assert.equal(e.event, 'chat.message');
    assert.equal(e.epoch, epoch);
    assert.ok(typeof e.ts === 'number' && typeof e.data?.text === 'string', JSON.stringify(e));
  }
  assert.equal(gotB[0].from, 'bob');
  assert.deepEqual(gotB.map((e) => e.replay === true), [false, false, false, false, true, true, false]);
  // What came over the wire: arrays, none of them for the seq B had to fetch by history.
  const arrays = b.log.received.filter((f) => Array.isArray(f) && f[0] === 'room:r7');
  assert.deepEqual(arrays.map((f) => f[1]), [1, 2, 4, 5, 6, 7]);
  assert.ok(!b.log.received.some((f) => f.type === 'event' && f.channel === 'room:r7'), 'no full event frame');
  assert.throws(() => connect({ url: relay.base, token: token('alice'), format: 'tiny' }), /format/);
});

test('ack: sent once the handler returned, each seq at most once, also across a resume', async () => {
  await room('r4', ['alice', 'bob']);
  const rec = recordingWebSocket();
  const c = client('alice', { WebSocket: rec.WebSocket });
  const sub = c.subscribe('room:r4');
  let release;
  const gate = new Promise((r) => { release = r; });
  const delivered = [];
  sub.on('event', async (e) => {
    delivered.push(e.seq);
    if (e.seq === 2) await gate; // the app is still showing event 2
  });
  await sub.ready;
  const acks = () => rec.log.sent.filter((f) => f.op === 'ack' && f.channel === 'room:r4').map((f) => f.seq);
  await publishMany(herald.base, 'r4', 3);
  await waitFor(() => acks().includes(1), 'the ack of 1');
  assert.ok(!acks().some((s) => s >= 2), 'nothing acked past a handler still running');
  release();
  await waitFor(() => acks().includes(3), 'the ack of 3 once the handler returned');
  relay.dropAll();
  await publishMany(herald.base, 'r4', 2, 'bob', 'later');
  await waitFor(() => acks().includes(5), 'acks after the resume');
  const all = acks();
  assert.ok(all.every((s, i) => i === 0 || s > all[i - 1]), `acks strictly increasing: ${all}`);
  assert.deepEqual(delivered, [1, 2, 3, 4, 5]);
});

test('token refresh on 4002: an expired token, then one that expires live', async () => {
  const asked = [];
  const rec = recordingWebSocket();
  const c = client('alice', {
    WebSocket: rec.WebSocket,
    token: undefined,
    getToken: async ({ refresh }) => {
      asked.push(refresh);
      if (asked.length === 1) return token('alice', { exp: -60 }); // expired at connect
      if (asked.length === 2) return token('alice', { exp: 1 }); // expires in the session (+5 s leeway)
      return token('alice');
    },
  });
  const closes = collect(c, 'disconnected');
  await waitFor(() => asked.length === 3 && c.connectionState === 'connected', 'the third token in use', 20000);
  assert.deepEqual(asked, [false, true, true]);
  assert.deepEqual(closes.map((d) => d.code), [4002, 4002]);
  assert.equal(closes[0].delay, 0, 'the first refresh reconnects at once');
  assert.equal((await c.ping()).type, 'pong');
});

test('a refused token closes with 4001 and never reconnects', async () => {
  const rec = recordingWebSocket();
  const bad = token('alice').replace(/.$/, (ch) => (ch === 'A' ? 'B' : 'A'));
  const c = client('alice', { WebSocket: rec.WebSocket, token: bad });
  const closed = await new Promise((r) => c.once('closed', r));
  assert.equal(closed.code, 4001);
  assert.equal(c.connectionState, 'closed');
  await assert.rejects(c.ready(), (e) => e.code === 'closed');
  await assert.rejects(c.publish('room:r1', 'x', {}), (e) => e.code === 'closed');
  // A reconnect would come within FAST.initial (100 ms ± 20 %): give it three times that.
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(rec.log.opened, 1, 'one attempt only');
});

test('the backend disconnecting the user (4012) stops the client', async () => {
  const c = client('dave');
  await c.ready();
  const closed = new Promise((r) => c.once('closed', r));
  await api(herald.base, 'POST', '/api/v1/users/dave/disconnect');
  assert.equal((await closed).code, 4012);
  assert.equal(c.connectionState, 'closed');
});

test('typing is throttled to one per interval per room', async () => {
  await room('r5', ['alice', 'bob']);
  const rec = recordingWebSocket();
  const alice = client('alice', { WebSocket: rec.WebSocket, typingInterval: 1000 });
  const bob = client('bob');
  const typing = collect(bob, 'typing');
  await Promise.all([alice.ready(), bob.ready()]);
  await Promise.all([alice.focus('r5'), bob.focus('r5')]);
  const first = Date.now();
  const results = [];
  for (let i = 0; i < 10; i++) results.push(await alice.typing('r5'));
  assert.deepEqual(results.map((r) => r.sent), [true, false, false, false, false, false, false, false, false, false]);
  await waitFor(() => typing.length === 1, 'bob sees alice typing');
  assert.deepEqual(typing[0], { room: 'r5', user: 'alice' });
  await waitFor(() => Date.now() - first >= 1000, 'the interval to pass', 3000);
  assert.equal((await alice.typing('r5')).sent, true);
  await waitFor(() => typing.length === 2, 'the second notice');
  assert.equal(rec.log.sent.filter((f) => f.op === 'typing').length, 2);
});

test("typing follows the server's interval: the connected frame's by default, the server's sent:false passed on", async () => {
  const slow = await startHerald({ toml: '[limits]\ntyping_interval = "2s"\n' });
  try {
    for (const u of ['alice', 'bob']) await api(slow.base, 'PUT', `/api/v1/rooms/r6/members/${u}`);
    const rec = recordingWebSocket();
    const open = (user, opts = {}) => {
      const c = connect({ url: slow.base, token: token(user), WebSocket, backoff: FAST, ...opts });
      clients.push(c);
      return c;
    };
    const alice = open('alice', { WebSocket: rec.WebSocket });
    const eager = open('alice', { typingInterval: 100 });
    const bob = open('bob');
    const typing = collect(bob, 'typing');
    const [session] = await Promise.all([alice.ready(), eager.ready(), bob.ready()]);
    assert.equal(session.typing_interval, 2000);
    await Promise.all([alice.focus('r6'), bob.focus('r6')]);
    const first = Date.now();
    assert.equal((await alice.typing('r6')).sent, true);
    await sleep(1100); // past the library's old fixed 1 s, inside the server's 2 s
    assert.equal((await alice.typing('r6')).sent, false);
    assert.equal(rec.log.sent.filter((f) => f.op === 'typing').length, 1, 'throttled in the client');
    // A client that throttles less: its second op goes out and the server coalesces it.
    assert.equal((await eager.typing('r6')).sent, true);
    await sleep(150);
    assert.equal((await eager.typing('r6')).sent, false, 'coalesced by the server');
    await waitFor(() => typing.length === 2, 'one notice from each of alice\'s sessions');
    await sleep(200);
    assert.equal(typing.length, 2);
    await waitFor(() => Date.now() - first >= 2000, 'the interval to pass', 4000);
    assert.equal((await alice.typing('r6')).sent, true);
    await waitFor(() => typing.length === 3, 'the next notice');
  } finally {
    await slow.stop();
  }
});

test('a restart on the memory backend: recovered false reaches the app as one refetch', async () => {
  await room('r6', ['alice', 'bob']);
  const c = client('alice');
  const sub = c.subscribe('room:r6');
  const got = collect(sub);
  const refetch = collect(sub, 'refetch');
  const all = collect(c, 'refetch');
  await sub.ready;
  await publishMany(herald.base, 'r6', 2);
  await waitFor(() => seqs(got).length === 2, 'events before the restart');
  const oldEpoch = sub.position.epoch;
  relay.refuse(true);
  const codes = collect(c, 'disconnected');
  await herald.stop(); // SIGTERM: the server says 1001 and closes
  herald = await startHerald();
  await room('r6', ['alice', 'bob']); // membership lived in memory too
  relay.retarget(herald);
  relay.refuse(false);
  await waitFor(() => refetch.length === 1, 'the refetch event');
  assert.equal(codes[0].code, 1001);
  assert.equal(refetch[0].reason, 'not_recovered');
  assert.equal(refetch[0].channel, 'room:r6');
  assert.equal(refetch[0].previous.epoch, oldEpoch);
  assert.notEqual(refetch[0].epoch, oldEpoch);
  // user:alice and global lost their history too: each says so once.
  await waitFor(() => all.length === 3, 'refetch for user:alice and global');
  assert.deepEqual(all.map((r) => r.channel).sort(), ['global', 'room:r6', 'user:alice']);
  await publishMany(herald.base, 'r6', 1, 'bob', 'new');
  await waitFor(() => seqs(got).length === 3, 'live again in the new epoch');
  assert.deepEqual(seqs(got), [1, 2, 1]);
  assert.equal(refetch.length, 1);
});

test('an op called while reconnecting waits, and is sent once the connection is back', async () => {
  await room('r7', ['alice', 'bob']);
  const alice = client('alice');
  const bob = client('bob');
  const bobSub = bob.subscribe('room:r7');
  const got = collect(bobSub);
  await Promise.all([alice.subscribe('room:r7').ready, bobSub.ready]);
  relay.refuse(true);
  relay.dropAll();
  await waitFor(() => alice.connectionState === 'reconnecting', 'alice reconnecting');
  const pending = alice.publish('room:r7', 'chat.message', { text: 'queued' });
  relay.refuse(false);
  const reply = await pending;
  assert.equal(reply.seq, 1);
  await waitFor(() => got.length === 1, 'bob gets the queued message');
  assert.equal(got[0].data.text, 'queued');
  const hist = await api(herald.base, 'GET', '/api/v1/rooms/r7/events?since=0');
  assert.equal(hist.events.length, 1, 'stored once');
});

test('close() while the socket is still connecting: closed, and nothing thrown afterwards', async () => {
  // A server that accepts and never answers the upgrade: the socket stays connecting.
  const held = [];
  const silent = net.createServer((sock) => held.push(sock));
  await new Promise((r) => silent.listen(0, '127.0.0.1', r));
  const uncaught = [];
  const record = (e) => uncaught.push(e);
  process.on('uncaughtException', record);
  try {
    const url = `http://127.0.0.1:${silent.address().port}`;
    const c = connect({ url, token: token('carol'), WebSocket, backoff: FAST });
    await waitFor(() => held.length === 1, 'the socket reaches the server');
    c.close();
    assert.equal(c.connectionState, 'closed');
    await sleep(200);
  } finally {
    process.off('uncaughtException', record);
    for (const sock of held) sock.destroy();
    silent.close();
  }
  assert.deepEqual(uncaught.map(String), []);
});
