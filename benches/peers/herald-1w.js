'use strict';
// herald with one tokio worker thread per node (TOKIO_WORKER_THREADS=1, as nginx runs one worker
// per instance here): the harness's `herald` driver otherwise unchanged. Copied beside
// drivers/herald.js by ./matrix.sh.
process.env.TOKIO_WORKER_THREADS = '1';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-1w',
  describe: () => ({ ...base.describe(), worker_threads: 1 }),
};
