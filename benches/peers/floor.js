'use strict';
// Driver: examples/fanfloor (herald's repository), the least work a Redis-backed WebSocket
// fan-out node can do on this runtime: one process and one thread per node, PUBLISH on POST
// /pub, one SUBSCRIBE connection, each message framed once and written straight to every
// subscriber's socket. No seq, history, presence, auth or JSON. Interface as drivers/nchan.js;
// copied beside it by ./matrix.sh. FLOOR_BIN overrides the binary (default: the fanfloor next
// to HERALD_BIN's target directory, built with `cargo build --release --example fanfloor`).

const fs = require('fs');
const path = require('path');
const http = require('http');
const { spawnLogged, stopPid, freePort, waitTcp } = require('../lib/proc');

function bin() {
  if (process.env.FLOOR_BIN) return process.env.FLOOR_BIN;
  if (process.env.HERALD_BIN) return path.join(path.dirname(process.env.HERALD_BIN), 'examples', 'fanfloor');
  return 'target/release/examples/fanfloor';
}

function describe() {
  return { floor_bin: bin(), threads_per_node: 1 };
}

async function startCluster({ runDir, nodeCount, redis }) {
  const b = bin();
  if (!fs.existsSync(b)) throw new Error(`${b} not found (cargo build --release --example fanfloor)`);
  const nodes = [];
  const pids = [];
  for (let i = 0; i < nodeCount; i++) {
    const id = String.fromCharCode(65 + i);
    const port = await freePort();
    const child = spawnLogged(`floor-${id}`, b, ['--listen', `127.0.0.1:${port}`, '--redis', redis.url], {
      logFile: path.join(runDir, `floor-${id}.log`),
    });
    pids.push(child.pid);
    await waitTcp(port, 10000);
    nodes.push({ id, port, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}/sub` });
  }
  return {
    nodes,
    serverPids: () => pids.slice(),
    gc: async () => false,
    stop: async () => { for (const p of pids) await stopPid(p, { signal: 'SIGTERM' }); },
  };
}

async function createPublisher(node) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  let sent = 0;
  let accepted = 0;
  let errors = 0;
  let pending = 0;
  const statuses = {};
  return {
    send(obj, json) {
      const body = json || JSON.stringify(obj);
      sent++;
      pending++;
      const req = http.request({
        agent, host: '127.0.0.1', port: node.port, path: '/pub', method: 'POST',
        headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
      }, (res) => {
        statuses[res.statusCode] = (statuses[res.statusCode] || 0) + 1;
        if (res.statusCode >= 200 && res.statusCode < 300) accepted++; else errors++;
        res.resume();
        res.on('end', () => { pending--; });
      });
      req.on('error', () => { errors++; pending--; });
      req.end(body);
    },
    stats: () => ({ sent, accepted, errors, http_status: { ...statuses } }),
    pending: () => pending,
    close: async () => { agent.destroy(); },
  };
}

let WS = null;
function connectSubscriber(node, index, onMessage, onClose) {
  if (!WS) WS = require('ws');
  return new Promise((resolve, reject) => {
    const ws = new WS(node.ws, { perMessageDeflate: false, handshakeTimeout: 20000 });
    let open = false;
    ws.on('message', (data) => onMessage(JSON.parse(data.toString())));
    ws.once('open', () => { open = true; resolve({ close: () => ws.close() }); });
    ws.once('error', (e) => { if (!open) reject(e); });
    ws.once('close', (code) => { if (open && onClose) onClose(code); });
  });
}

module.exports = { name: 'floor', describe, startCluster, createPublisher, connectSubscriber };
