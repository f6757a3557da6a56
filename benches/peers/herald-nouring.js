'use strict';
// herald with its writer tasks sending one send() per socket (HERALD_IO_URING=false) instead of
// one io_uring submission per batch: the harness's `herald` driver otherwise unchanged. Copied
// beside drivers/herald.js by ./matrix.sh.
process.env.HERALD_IO_URING = 'false';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-nouring',
  describe: () => ({ ...base.describe(), io_uring: false }),
};
