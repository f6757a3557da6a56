// The example page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core),
// loaded from a real herald (which serves it and the library at /client/) behind the TCP relay:
// two pages chat, survive the relay dropping every connection (a message published meanwhile
// arrives once), and a page going to the background reaches the server as the device's state
// (read back over the HTTP presence API).
//
// Headless Chromium keeps every page "visible" (minimising the window or opening tabs changes
// nothing), so the test sets `document.visibilityState` and fires the browser's own
// `visibilitychange` event: what the library listens to and reads.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { api, cleanup, publishMany, startHerald, startRelay, token, waitFor } from './helpers.js';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

let herald;
let relay;
let browser;

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no chromium at ${CHROMIUM} (apt-get install chromium)`);
  herald = await startHerald();
  relay = await startRelay(herald);
  for (const u of ['alice', 'bob']) await api(herald.base, 'PUT', `/api/v1/rooms/lobby/members/${u}`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  await relay?.close();
  await cleanup();
});

async function openChat(user) {
  const context = await browser.newContext(); // its own storage: its own device id
  const page = await context.newPage();
  page.setDefaultTimeout(10000);
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  // Herald serves the page with a CSP: anything it blocks is a failure (the browser says so on the
  // console; other console errors, such as a WebSocket failing while the relay drops it, are not).
  page.on('console', (m) => { if (/Content.Security.Policy/i.test(m.text())) errors.push(m.text()); });
  // The page as herald serves it (through the relay): it connects to the origin that served it,
  // with the token from the fragment.
  await page.goto(`${relay.base}/client/example/?room=lobby#token=${token(user)}`);
  await page.locator('#status').filter({ hasText: /^connected$/ }).waitFor();
  return { page, errors };
}

const lines = (page) => page.locator('#log li').allInnerTexts();

test('the example page: chat between two pages, dropped connections, background state', { timeout: 90000 }, async () => {
  const alice = await openChat('alice');
  const bob = await openChat('bob');
  const a = alice.page;
  const b = bob.page;
  // Both are subscribed (and focused) before anyone speaks.
  await waitFor(async () => (await api(herald.base, 'GET', '/api/v1/rooms/lobby/presence')).users.length === 2, 'both present');

  await a.fill('#text', 'hello bob');
  await b.locator('#typing').filter({ hasText: 'alice is typing' }).waitFor();
  await a.click('#send');
  await b.locator('#log li', { hasText: 'alice: hello bob' }).waitFor();
  await a.locator('#log li.sent', { hasText: 'alice: hello bob' }).waitFor(); // optimistic line confirmed
  await b.fill('#text', 'hi alice');
  await b.click('#send');
  await a.locator('#log li', { hasText: 'bob: hi alice' }).waitFor();

  // The network drops every connection; a message is published while the pages are away.
  relay.refuse(true);
  relay.dropAll();
  await a.locator('#status').filter({ hasText: 'reconnecting' }).waitFor();
  await b.locator('#status').filter({ hasText: 'reconnecting' }).waitFor();
  await publishMany(herald.base, 'lobby', 1, 'carol', 'while you were away');
  relay.refuse(false);
  for (const p of [a, b]) {
    await p.locator('#status').filter({ hasText: /^connected$/ }).waitFor();
    await p.locator('#log li', { hasText: 'carol: while you were away0' }).waitFor();
  }
  await a.fill('#text', 'still here');
  await a.click('#send');
  await b.locator('#log li', { hasText: 'alice: still here' }).waitFor();
  assert.deepEqual(await lines(b), ['alice: hello bob', 'bob: hi alice', 'carol: while you were away0', 'alice: still here']);
  assert.deepEqual(await lines(a), ['alice: hello bob', 'bob: hi alice', 'carol: while you were away0', 'alice: still here']);

  // Bob's page goes to the background, then comes back: the server's presence says so.
  const device = await b.evaluate(() => window.heraldClient.device);
  const stateOf = async () => (await api(herald.base, 'GET', '/api/v1/presence/bob')).devices.find((d) => d.device === device)?.state;
  assert.equal(await stateOf(), 'foreground');
  const setVisibility = (v) => b.evaluate((v) => {
    Object.defineProperty(document, 'visibilityState', { value: v, configurable: true });
    document.dispatchEvent(new Event('visibilitychange'));
  }, v);
  await setVisibility('hidden');
  await waitFor(async () => (await stateOf()) === 'background', 'bob in the background');
  await setVisibility('visible');
  await waitFor(async () => (await stateOf()) === 'foreground', 'bob in the foreground again');
  assert.deepEqual([...alice.errors, ...bob.errors], []);
});
