'use strict';
// RSS per WebSocket before and after a burst, on a running herald node (memory backend or Redis):
//   HERALD_JWT_SECRET=… HERALD_API_KEY=… NODE_PATH=clients/js/node_modules \
//     node benches/burst-memory.js PORT ENGINE_PID [CONNECTIONS=2000] [BURST=200]
// Makes CONNECTIONS users members of room `burst`, reads the engine's VmRSS, connects and subscribes
// them all (the room's join storm included), reads it again (idle), then every client stops reading
// while BURST events are published to the room, reads it (queued), lets them read everything and
// reads it once more 3 s later (after the drain). Prints one JSON line, KB per connection over the
// RSS before any connection. Use a freshly started engine: memory an earlier run freed is reused.
// (`ws` comes from clients/js: npm ci there first.)
const WebSocket = require('ws');
const crypto = require('crypto'); const http = require('http'); const fs = require('fs');
const [port, pid] = process.argv.slice(2, 4);
const N = +(process.argv[4] || 2000), BURST = +(process.argv[5] || 200);
if (!port || !pid) { console.error('usage: node benches/burst-memory.js PORT ENGINE_PID [CONNECTIONS] [BURST]'); process.exit(2); }
const SECRET = process.env.HERALD_JWT_SECRET, KEY = process.env.HERALD_API_KEY;
if (!SECRET || !KEY) { console.error('set HERALD_JWT_SECRET and HERALD_API_KEY to the engine\'s'); process.exit(2); }
const b64 = (b) => Buffer.from(b).toString('base64url');
const jwt = (sub) => { const h = b64(JSON.stringify({alg:'HS256',typ:'JWT'})), p = b64(JSON.stringify({sub, exp: Math.floor(Date.now()/1000)+3600}));
  return `${h}.${p}.${b64(crypto.createHmac('sha256', SECRET).update(`${h}.${p}`).digest())}`; };
const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
const api = (method, path, body) => new Promise((res, rej) => { const d = body ? JSON.stringify(body) : null;
  const r = http.request({ host: '127.0.0.1', port, method, path, agent, headers: { authorization: `Bearer ${KEY}`, ...(d ? {'content-type':'application/json','content-length':Buffer.byteLength(d)} : {}) } },
    (s) => { let b=''; s.on('data', (c)=>b+=c); s.on('end', ()=>res([s.statusCode,b])); }); r.on('error', rej); r.end(d); });
const rss = () => +fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  for (let i = 0; i < N; i += 100) await Promise.all([...Array(Math.min(100, N - i)).keys()].map((k) => api('PUT', `/api/v1/rooms/burst/members/b${i+k}`)));
  await sleep(1000); const base = rss();
  const socks = []; let got = 0;
  for (let i = 0; i < N; i += 200) await Promise.all([...Array(Math.min(200, N - i)).keys()].map((k) => new Promise((ok, bad) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?token=${jwt('b' + (i + k))}`); socks.push(ws);
    ws.on('message', (m) => { const s = m.toString(); if (s.includes('"connected"')) ws.send('{"op":"subscribe","channel":"room:burst","ref":1}');
      else if (s.includes('"ref":1')) ok(); else if (s.includes('"type":"event"')) got++; });
    ws.on('error', bad); })));
  await sleep(2000); const idle = rss();
  // The burst: every client stops reading, BURST events are published, then they read again.
  for (const ws of socks) ws._socket.pause();
  for (let i = 0; i < BURST; i += 20) await Promise.all([...Array(20).keys()].map((k) => api('POST', '/api/v1/events', {event: 'b', channel: 'room:burst', data: {i: i + k, pad: 'x'.repeat(100)}})));
  await sleep(1000); const during = rss();
  for (const ws of socks) ws._socket.resume();
  while (got < N * BURST) { await sleep(100); }
  await sleep(3000); const after = rss();
  const per = (x) => ((x - base) / N).toFixed(2);
  console.log(JSON.stringify({ connections: N, burst_events: BURST, delivered: got, kb_per_conn_idle: +per(idle), kb_per_conn_while_queued: +per(during), kb_per_conn_after_drain: +per(after) }));
  process.exit(0);
})();
