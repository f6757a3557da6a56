'use strict';
// herald with the compact event encoding (`/ws?...&format=compact`): the same servers and publisher as
// the harness's `herald` driver, subscribers that ask for compact frames and read
// `[channel, seq, event, data, ts, from?]`. Copied beside drivers/herald.js by ./matrix.sh.
const crypto = require('crypto');
const http = require('http');
const base = require('./herald');

const CHANNEL = 'room:bench';
const JWT_SECRET = process.env.HERALD_JWT_SECRET || 'bench-secret-0123456789abcdef';
const API_KEY = process.env.HERALD_API_KEY || 'bench-key';

function b64url(buf) {
  return Buffer.from(buf).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
}

function jwt(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = b64url(crypto.createHmac('sha256', JWT_SECRET).update(`${head}.${body}`).digest());
  return `${head}.${body}.${sig}`;
}

function putMember(port, user) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port, method: 'PUT', path: `/api/v1/rooms/bench/members/${user}`,
      headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json', 'Content-Length': 2 },
    }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode)); });
    req.on('error', reject);
    req.end('{}');
  });
}

let WS = null;
async function connectSubscriber(node, index, onMessage, onClose) {
  if (!WS) WS = require('ws');
  const user = `bench-${index}`;
  if (process.env.HERALD_ENSURE_MEMBERSHIP === '1') {
    const s = await putMember(node.port, user);
    if (s < 200 || s >= 300) throw new Error(`membership PUT -> ${s}`);
  }
  const token = jwt({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 });
  return new Promise((resolve, reject) => {
    const ws = new WS(`ws://127.0.0.1:${node.port}/ws?token=${token}&format=compact`,
      { perMessageDeflate: false, handshakeTimeout: 20000 });
    let subscribed = false;
    ws.on('message', (data) => {
      const f = JSON.parse(data.toString());
      if (Array.isArray(f)) {
        if (f[0] === CHANNEL) onMessage(f[3]);
      } else if (!subscribed && f.type === 'reply' && f.ref === 1) {
        if (!f.ok) {
          reject(new Error(`subscribe refused: ${JSON.stringify(f.error)}`));
          ws.close();
          return;
        }
        subscribed = true;
        resolve({ close: () => ws.close() });
      }
    });
    ws.once('open', () => ws.send(JSON.stringify({ op: 'subscribe', channel: CHANNEL, ref: 1 })));
    ws.once('error', (e) => { if (!subscribed) reject(e); });
    ws.once('close', (code) => {
      if (!subscribed) reject(new Error(`closed ${code} before subscribed`));
      else if (onClose) onClose(code);
    });
  });
}

module.exports = {
  ...base,
  name: 'herald-compact',
  describe: () => ({ ...base.describe(), format: 'compact' }),
  connectSubscriber,
};
