// The example page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core)
// against a real herald behind the TCP relay: two pages chat, survive the relay dropping every
// connection (a message published meanwhile arrives once), and a page going to the background
// reaches the server as the device's state (read back over the HTTP presence API).
//
// Headless Chromium keeps every page "visible" (minimising the window or opening tabs changes
// nothing), so the test sets `document.visibilityState` and fires the browser's own
// `visibilitychange` event: what the library listens to and reads.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { existsSync, readFileSync } from 'node:fs';
import { extname, join, normalize } from 'node:path';
import { chromium } from 'playwright-core';
import { api, cleanup, PKG, publishMany, startHerald, startRelay, token, waitFor } from './helpers.js';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };

let herald;
let relay;
let files;
let filesBase;
let browser;

/** Any static server will do: this one serves clients/js. */
function serveStatic(root) {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '');
    let file = join(root, path);
    if (file.endsWith('/')) file = join(file, 'index.html');
    if (!file.startsWith(root) || !existsSync(file)) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream' });
    res.end(readFileSync(file));
  });
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r(server)));
}

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no chromium at ${CHROMIUM} (apt-get install chromium)`);
  herald = await startHerald();
  relay = await startRelay(herald);
  for (const u of ['alice', 'bob']) await api(herald.base, 'PUT', `/api/v1/rooms/lobby/members/${u}`);
  files = await serveStatic(PKG);
  filesBase = `http://127.0.0.1:${files.address().port}`;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  await new Promise((r) => (files ? files.close(r) : r()));
  await relay?.close();
  await cleanup();
});

async function openChat(user) {
  const context = await browser.newContext(); // its own storage: its own device id
  const page = await context.newPage();
  page.setDefaultTimeout(10000);
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  const q = new URLSearchParams({ url: relay.base, token: token(user), room: 'lobby' });
  await page.goto(`${filesBase}/example/?${q}`);
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
