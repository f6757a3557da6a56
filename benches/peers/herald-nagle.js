'use strict';
// herald with Nagle's algorithm left on for accepted connections (HERALD_TCP_NODELAY=0): the
// harness's `herald` driver otherwise unchanged. Copied beside drivers/herald.js by ./matrix.sh.
process.env.HERALD_TCP_NODELAY = '0';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-nagle',
  describe: () => ({ ...base.describe(), tcp_nodelay: false }),
};
