// The admin page in headless Chromium against a real `herald serve` (the binary HERALD_BIN names;
// scripts/test sets it to target/debug/herald): a wrong key is refused, a login shows the node,
// the live figures move when a WebSocket connects and events are published through the HTTP API,
// a dry run shows the decision and which rule file took it, a user lookup shows the WebSocket
// user's presence and session, a channel lookup its subscriber; the page asks no host but the
// engine, and the key is in no URL. A screenshot of the filled page is taken; with
// HERALD_SCREENSHOT=1 it is written to docs/admin.png (the README's), else to a temp directory.
//
// Run: HERALD_BIN=target/debug/herald node --test tests/browser/

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = resolve(process.env.HERALD_BIN || join(REPO, 'target', 'debug', 'herald'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const API_KEY = 'browser-api-key-0123456789';
const ADMIN_KEY = 'browser-admin-key-0123456789';
const SECRET = 'browser-jwt-secret-0123456789';
const NODE_ID = 'browser-node';
const WAIT = 15000;

let herald;
let base;
let work;
let context;
let stderr = '';

/** Starts `herald serve` on port 0 and resolves with its base URL, read from the banner. */
function startHerald(dir) {
  const args = ['serve', '--listen', '127.0.0.1:0', '--node-id', NODE_ID, '--heartbeat', '1',
    '--rules', join(REPO, 'rules'), '--channels', join(REPO, 'channels.toml')];
  const env = { PATH: process.env.PATH, HERALD_API_KEY: API_KEY, HERALD_ADMIN_KEY: ADMIN_KEY,
    HERALD_JWT_SECRET: SECRET, HERALD_LOG: 'warn' };
  herald = spawn(BIN, args, { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  herald.stderr.on('data', (d) => { stderr += d; });
  return new Promise((resolveUrl, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('herald printed no banner: ' + out + stderr)), WAIT);
    herald.on('exit', (code) => reject(new Error(`herald exited (${code}): ${stderr}`)));
    herald.stdout.on('data', (d) => {
      out += d;
      const m = /herald listening on (http:\/\/\S+)/.exec(out);
      if (m) { clearTimeout(timer); resolveUrl(m[1]); }
    });
  });
}

function b64url(x) {
  return Buffer.from(x).toString('base64url');
}

/** An HS256 client token, as the application's backend would mint it. */
function token(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims }));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** A backend API call with the API key (Node's fetch, not the browser). */
async function apiCall(method, path, body) {
  const r = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  assert.ok(r.ok, `${method} ${path}: ${r.status} ${text}`);
  return JSON.parse(text);
}

before(async () => {
  assert.ok(existsSync(BIN), `no herald binary at ${BIN} (set HERALD_BIN, or cargo build first)`);
  assert.ok(existsSync(CHROMIUM), `no chromium at ${CHROMIUM} (apt-get install chromium)`);
  work = mkdtempSync(join(tmpdir(), 'herald-browser-'));
  base = await startHerald(work);
  context = await chromium.launchPersistentContext(join(work, 'profile'), {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1360, height: 900 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  if (context) await context.close();
  if (herald && herald.exitCode === null) {
    const exited = new Promise((r) => herald.once('exit', r));
    herald.kill('SIGTERM');
    await exited;
  }
  if (work) rmSync(work, { recursive: true, force: true });
});

const text = (page, sel) => page.locator(sel).innerText();

test('the admin page: login, live figures, dry run, lookups, and nothing but the engine asked', { timeout: 120000 }, async () => {
  const urls = [];
  context.on('request', (r) => urls.push(r.url()));
  const page = context.pages()[0] || await context.newPage();
  page.on('websocket', (ws) => urls.push(ws.url()));
  page.setDefaultTimeout(WAIT);

  await page.goto(base + '/admin');
  assert.equal(await page.locator('#app').isVisible(), false, 'nothing shown before a login');

  // A wrong key: a clear error, still on the login form.
  await page.fill('#key', 'not-the-admin-key');
  await page.click('#login-go');
  await page.locator('#login-error').filter({ hasText: 'Wrong admin key' }).waitFor();
  assert.equal(await page.locator('#app').isVisible(), false);

  // The right key: the dashboard with this node's facts.
  await page.fill('#key', ADMIN_KEY);
  await page.click('#login-go');
  await page.locator('#app').waitFor({ state: 'visible' });
  await page.locator('#h-node').filter({ hasText: NODE_ID }).waitFor();
  assert.equal(await text(page, '#h-backend'), 'memory');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('herald-admin-key')), ADMIN_KEY);
  assert.equal(await page.evaluate(() => document.cookie), '', 'no cookie');
  await page.locator('#nodes-body').filter({ hasText: NODE_ID }).waitFor();
  await page.locator('#verdict-word').waitFor();
  await page.locator('#fig-sessions .value').filter({ hasText: /^0$/ }).waitFor();

  // A WebSocket client (a second tab) connects: the session figure moves.
  const client = await context.newPage();
  await client.goto(base + '/healthz');
  const alice = token({ sub: 'alice', device: 'laptop-1', platform: 'web' });
  const connected = await client.evaluate((url) => new Promise((ok, fail) => {
    const ws = new WebSocket(url);
    window.heraldSocket = ws;
    ws.onmessage = (m) => ok(JSON.parse(m.data).type);
    ws.onerror = () => fail(new Error('WebSocket failed'));
  }), base.replace(/^http/, 'ws') + '/ws?token=' + alice);
  assert.equal(connected, 'connected');
  await page.locator('#fig-sessions .value').filter({ hasText: /^1$/ }).waitFor();

  // Events published through the HTTP API: the publish and delivery figures move.
  const totalOf = async () => {
    const sub = await text(page, '#fig-publishes .sub');
    const m = /total ([\d,]+)/.exec(sub);
    return m ? Number(m[1].replace(/,/g, '')) : 0;
  };
  const before = await totalOf();
  await apiCall('PUT', '/api/v1/rooms/r1/members/alice');
  let sawRate = false;
  const deadline = Date.now() + WAIT;
  let n = 0;
  while (!(sawRate && (await totalOf()) >= before + 3) && Date.now() < deadline) {
    await apiCall('POST', '/api/v1/events', { event: 'note', to: ['alice'], data: { n: n++ } });
    await page.waitForTimeout(250);
    const rate = Number((await text(page, '#fig-publishes .value')).replace(/,/g, ''));
    if (rate > 0) sawRate = true;
  }
  assert.ok(sawRate, 'publishes/s went above 0');
  assert.ok((await totalOf()) >= before + 3, 'the publish total moved');
  await page.waitForFunction(() => Number(document.querySelector('#fig-deliveries .sub').textContent.replace(/\D/g, '')) > 0);
  // The latency tiles read the publish and fan-out histograms: a duration, not "–".
  for (const id of ['#fig-publish_p99', '#fig-fanout_p99']) {
    await page.locator(id + ' .value').filter({ hasText: /^(> )?[\d.]+ (ms|s)$/ }).waitFor();
  }

  // A dry run: the decision and which rule file took it.
  await page.fill('#dry-event', '{"event": "chat.message", "room": "r1", "from": "alice", "data": {"text": "hi"}}');
  await page.click('#dry-run');
  await page.locator('#dry-by').filter({ hasText: '10-seeds.rhai::route' }).waitFor();
  assert.match(await text(page, '#dry-summary'), /Goes to room:r1/);
  await page.fill('#dry-event', '{not json');
  await page.click('#dry-run');
  await page.locator('#dry-result .error').filter({ hasText: 'not JSON' }).waitFor();
  await page.fill('#dry-event', '{"event": "chat.message", "room": "r1", "from": "alice", "data": {"text": "hi"}}');
  await page.click('#dry-run');
  await page.locator('#dry-by').waitFor();

  // A user lookup: alice's presence and her session on this node.
  await page.fill('#user-id', 'alice');
  await page.click('#user-go');
  await page.locator('#user-online').filter({ hasText: 'online' }).waitFor();
  const user = await text(page, '#user-result');
  assert.match(user, /laptop-1/);
  assert.match(user, new RegExp(NODE_ID + ' \\(here\\)'));
  assert.match(user, /r1/);
  await page.fill('#user-id', 'bad id');
  await page.click('#user-go');
  await page.locator('#user-result .error').filter({ hasText: 'bad_channel' }).waitFor();
  await page.fill('#user-id', 'nobody');
  await page.click('#user-go');
  await page.locator('#user-online').filter({ hasText: 'offline' }).waitFor();
  await page.fill('#user-id', 'alice');
  await page.click('#user-go');
  await page.locator('#user-online').filter({ hasText: 'online' }).waitFor();

  // A channel lookup: alice's own channel, with her as its subscriber here.
  await page.fill('#channel-id', 'user:alice');
  await page.click('#channel-go');
  await page.locator('#channel-subscribers').filter({ hasText: /^1$/ }).waitFor();
  assert.match(await text(page, '#channel-result'), /note/);

  // The screenshot for the README, once every panel has something in it.
  await page.locator('#push-body').filter({ hasText: 'providers' }).waitFor();
  await page.locator('#rules-body').filter({ hasText: '10-seeds.rhai' }).waitFor();
  const shot = process.env.HERALD_SCREENSHOT === '1' ? join(REPO, 'docs', 'admin.png') : join(work, 'admin.png');
  await page.screenshot({ path: join(work, 'shot.png'), fullPage: true });
  const png = readFileSync(join(work, 'shot.png'));
  assert.equal(png.subarray(1, 4).toString(), 'PNG');
  if (shot !== join(work, 'admin.png')) copyFileSync(join(work, 'shot.png'), shot);

  // Logging out forgets the key and shows the form again.
  await page.click('#logout');
  await page.locator('#login').waitFor({ state: 'visible' });
  assert.equal(await page.evaluate(() => sessionStorage.getItem('herald-admin-key')), null);
  assert.equal(await page.locator('#app').isVisible(), false);

  await client.evaluate(() => window.heraldSocket.close());
  const origin = new URL(base);
  for (const u of urls) {
    if (u.startsWith('data:')) continue;
    const host = new URL(u).host;
    assert.equal(host, origin.host, `a request to another host: ${u}`);
    assert.ok(!u.includes(ADMIN_KEY), `the admin key in a URL: ${u}`);
  }
  assert.ok(urls.some((u) => u.endsWith('/admin/status')), 'the page polled the status');
});
