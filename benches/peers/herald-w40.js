'use strict';
// herald with a 40 ms coalescing window (HERALD_COALESCE_WINDOW=40ms; the default is 50 ms): the
// harness's herald driver otherwise unchanged. Copied beside drivers/herald.js by ./matrix.sh.
process.env.HERALD_COALESCE_WINDOW = '40ms';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-w40',
  describe: () => ({ ...base.describe(), coalesce_window_ms: 40 }),
};
