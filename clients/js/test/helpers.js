// Test harness: a real `herald serve` (HERALD_BIN) on port 0, a private redis-server on a unix
// socket, and a TCP relay in front of herald so that a test can drop every connection at once (the
// network failing) or restart herald behind the same address. Every spawned process is ended by
// `cleanup()` (the tests' `after`) and, as a last resort, when this process exits.

import { spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

const HERE = dirname(fileURLToPath(import.meta.url));
export const PKG = resolve(HERE, '..');
export const REPO = resolve(PKG, '..', '..');
export const BIN = resolve(PKG, process.env.HERALD_BIN || '../../target/debug/herald');
export const API_KEY = 'js-client-api-key-0123456789';
export const ADMIN_KEY = 'js-client-admin-key-0123456789';
export const SECRET = 'js-client-jwt-secret-0123456789';
/** Longest any wait lasts. */
export const WAIT = 10000;

export { WebSocket };

const live = new Set();
process.on('exit', () => {
  for (const p of live) try { p.kill('SIGKILL'); } catch { /* gone */ }
});

/** A fresh temporary directory, removed by `cleanup`. */
const dirs = [];
export function tempDir(prefix = 'herald-js-') {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** Polls `fn` until it returns a truthy value (returned), or fails after `timeout` ms. */
export async function waitFor(fn, what = 'condition', timeout = WAIT) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function b64url(x) {
  return Buffer.from(x).toString('base64url');
}

/** An HS256 client JWT, as the app's backend mints it. `exp` in seconds from now (default 1 h). */
export function token(sub, { exp = 3600, ...claims } = {}) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + exp, ...claims }));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** A private redis-server on a unix socket. `persist` turns on the append-only file. */
export async function startRedis({ persist = false } = {}) {
  const dir = tempDir('herald-js-redis-');
  const sock = join(dir, 'redis.sock');
  const args = ['--port', '0', '--unixsocket', sock, '--unixsocketperm', '700', '--dir', dir,
    '--save', '', '--appendonly', persist ? 'yes' : 'no', '--appendfsync', 'always'];
  const proc = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(proc);
  proc.on('exit', () => live.delete(proc));
  await waitFor(() => existsSync(sock) && cli(sock, 'PING') === 'PONG', 'redis-server');
  return {
    url: `unix://${sock}`,
    sock,
    cli: (...a) => cli(sock, ...a),
    async stop() { await stopProc(proc); },
  };
}

function cli(sock, ...args) {
  const r = spawnSync('redis-cli', ['-s', sock, ...args], { encoding: 'utf8' });
  return r.stdout.trim();
}

async function stopProc(proc, signal = 'SIGTERM') {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const gone = new Promise((r) => proc.once('exit', r));
  proc.kill(signal);
  const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(t);
}

/**
 * Starts `herald serve` on port 0 (memory backend, or `redis` when given) and resolves with
 * `{base, addr, stop, proc}` once its banner names the address.
 */
export async function startHerald({ redis, env = {}, heartbeat, toml } = {}) {
  if (!existsSync(BIN)) throw new Error(`no herald binary at ${BIN} (set HERALD_BIN)`);
  const args = ['serve', '--listen', '127.0.0.1:0', '--rules', '/nonexistent/herald-js-rules',
    '--channels', join(REPO, 'channels.toml')];
  if (redis) args.push('--redis', redis);
  if (heartbeat) args.push('--heartbeat', String(heartbeat));
  const cwd = tempDir('herald-js-node-');
  if (toml) writeFileSync(join(cwd, 'herald.toml'), toml); // read from the working directory
  const proc = spawn(BIN, args, {
    cwd,
    env: { PATH: process.env.PATH, HERALD_API_KEY: API_KEY, HERALD_ADMIN_KEY: ADMIN_KEY,
      HERALD_JWT_SECRET: SECRET, HERALD_LOG: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(proc);
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr += d; });
  const base = await new Promise((ok, fail) => {
    let out = '';
    const t = setTimeout(() => fail(new Error(`herald printed no banner: ${out} ${stderr}`)), WAIT);
    proc.on('exit', (code) => { live.delete(proc); clearTimeout(t); fail(new Error(`herald exited (${code}): ${stderr}`)); });
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /herald listening on (http:\/\/[^\s]+)/.exec(out);
      if (m) { clearTimeout(t); ok(m[1]); }
    });
  });
  const addr = new URL(base);
  return {
    base,
    host: addr.hostname,
    port: Number(addr.port),
    proc,
    stderr: () => stderr,
    stop: (signal) => stopProc(proc, signal),
  };
}

/**
 * A TCP relay on 127.0.0.1:0 to `target` ({host, port}, changeable with `retarget`). `dropAll`
 * destroys every relayed connection: the client sees the network fail (no close frame).
 */
export async function startRelay(target) {
  const pairs = new Set();
  let to = target;
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) { client.destroy(); return; }
    const upstream = net.connect(to.port, to.host);
    const pair = { client, upstream };
    pairs.add(pair);
    const end = () => { client.destroy(); upstream.destroy(); pairs.delete(pair); };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  return {
    base: `http://127.0.0.1:${port}`,
    get connections() { return pairs.size; },
    retarget(t) { to = t; },
    refuse(on) { refusing = on; },
    dropAll() { for (const p of [...pairs]) { p.client.destroy(); p.upstream.destroy(); pairs.delete(p); } },
    close: () => new Promise((r) => { for (const p of pairs) { p.client.destroy(); p.upstream.destroy(); } server.close(r); }),
  };
}

/** A backend call with the API key. */
export async function api(base, method, path, body, key = API_KEY) {
  const r = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return JSON.parse(text);
}

/** Backend publish of `n` messages to a room, in order; resolves with their seqs. */
export async function publishMany(base, room, n, from = 'bob', prefix = 'm') {
  const seqs = [];
  for (let i = 0; i < n; i++) {
    const r = await api(base, 'POST', '/api/v1/events', { event: 'chat.message', room, from, data: { text: `${prefix}${i}` } });
    seqs.push(r.deliveries[0].seq);
  }
  return seqs;
}

/**
 * A WebSocket class that records every frame the client sends and every socket it opens: what
 * the tests read to count connection attempts and acks.
 */
export function recordingWebSocket(options = {}) {
  const log = { opened: 0, sent: [], received: [], sockets: [] };
  class Recording extends WebSocket {
    constructor(url) {
      super(url, options);
      log.opened += 1;
      log.sockets.push(this);
      this.addEventListener('message', (ev) => log.received.push(JSON.parse(ev.data)));
    }
    send(data, ...rest) {
      log.sent.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: Recording, log };
}

/** Collects a subscription's (or client's) events into an array. */
export function collect(emitter, name = 'event') {
  const got = [];
  emitter.on(name, (e) => { got.push(e); });
  return got;
}

/** Ends every spawned process and removes the temporary directories. */
export async function cleanup(...extra) {
  for (const x of extra) {
    try { await x?.(); } catch { /* best effort */ }
  }
  for (const p of [...live]) await stopProc(p);
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** Fast reconnects for tests: the policy is the same, the delays shorter. */
export const FAST = { initial: 100, max: 1000, jitter: 0.2, resetAfter: 2000 };
