'use strict';
// herald with a 50 ms coalescing window (HERALD_COALESCE_WINDOW=50ms; the default is 40 ms): the
// harness's herald driver otherwise unchanged. Copied beside drivers/herald.js by ./matrix.sh.
process.env.HERALD_COALESCE_WINDOW = '50ms';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-w50',
  describe: () => ({ ...base.describe(), coalesce_window_ms: 50 }),
};
