// The close-code policy and the backoff, as pure functions. 4003 is here because this server
// version never sends it (protocol.md: "reserved"), so no wire test can produce it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backoff, closePolicy } from '../src/index.js';

test('close codes: stop on 4001/4003/4012, refresh on 4002, back off on the rest', () => {
  for (const code of [4001, 4003, 4012]) assert.equal(closePolicy(code).action, 'stop', String(code));
  assert.equal(closePolicy(4002).action, 'refresh');
  for (const code of [1001, 1006, 1011, 1013, 4008, 4009, 4010, 4011, 4999]) {
    assert.equal(closePolicy(code).action, 'backoff', String(code));
  }
});

test('backoff: doubles from initial up to max, within the jitter, and starts over on reset', () => {
  const b = new Backoff({ initial: 1000, max: 30000, jitter: 0.2 });
  const lo = [];
  const hi = [];
  const low = new Backoff({ initial: 1000, max: 30000, jitter: 0.2 });
  const high = new Backoff({ initial: 1000, max: 30000, jitter: 0.2 });
  for (let i = 0; i < 8; i++) {
    lo.push(low.next(() => 0));
    hi.push(high.next(() => 0.999999));
    const d = b.next();
    const base = Math.min(30000, 1000 * 2 ** i);
    assert.ok(d >= base * 0.8 - 1 && d <= base * 1.2 + 1, `attempt ${i}: ${d} outside ${base} ±20 %`);
  }
  assert.deepEqual(lo, [800, 1600, 3200, 6400, 12800, 24000, 24000, 24000]);
  assert.deepEqual(hi, [1200, 2400, 4800, 9600, 19200, 36000, 36000, 36000]);
  b.reset();
  assert.ok(b.next() <= 1200);
});
