'use strict';
// herald with `[http] direct_writes = false` (HERALD_DIRECT_WRITES=false): every delivery goes
// through the session's queue and task, as before the fan-out wrote to idle sockets itself. The
// harness's `herald` driver otherwise unchanged. Copied beside drivers/herald.js by ./matrix.sh.
process.env.HERALD_DIRECT_WRITES = 'false';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-queued',
  describe: () => ({ ...base.describe(), direct_writes: false }),
};
