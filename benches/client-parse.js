'use strict';
// What a Node.js client pays to turn one received frame into its payload, per frame form: the raw
// 100-byte payload (as nchan sends it), herald's full event frame and its compact one, built the way
// the harness's publisher builds its payload. Buffer -> string -> JSON.parse -> the payload's `t`,
// as the harness's subscribers do. Run: node benches/client-parse.js [frames]
const N = Number(process.argv[2] || 2e6);
const payload = { s: 123456, w: 0, t: 1234567890123.5 };
payload.p = 'x'.repeat(Math.max(0, 100 - JSON.stringify(payload).length));
const forms = {
  raw: Buffer.from(JSON.stringify(payload)),
  full: Buffer.from(JSON.stringify({
    type: 'event', channel: 'room:bench', seq: 123456, epoch: 'b9012b898c38',
    id: '01a25219-fb70-7243-a1f3-72c03f1f0cb7', event: 'bench', data: payload, ts: 1796673764208,
  })),
  compact: Buffer.from(JSON.stringify(['room:bench', 123456, 'bench', payload, 1796673764208])),
};
const read = {
  raw: (f) => f.t,
  full: (f) => (f.type === 'event' && f.channel === 'room:bench' ? f.data.t : 0),
  compact: (f) => (Array.isArray(f) && f[0] === 'room:bench' ? f[3].t : 0),
};
for (let round = 0; round < 3; round++) {
  for (const [name, buf] of Object.entries(forms)) {
    let sum = 0;
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) sum += read[name](JSON.parse(buf.toString()));
    const ns = Number(process.hrtime.bigint() - t0) / N;
    if (round > 0 && sum > 0) console.log(`${name.padEnd(8)} ${String(buf.length).padStart(4)} bytes  ${ns.toFixed(0)} ns per frame`);
  }
}
