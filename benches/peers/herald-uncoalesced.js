'use strict';
// herald with coalesced writes off (HERALD_COALESCE=off: every delivery written at once, however
// busy the CPU): the harness's herald driver otherwise unchanged. Copied beside drivers/herald.js
// by ./matrix.sh.
process.env.HERALD_COALESCE = 'off';
const base = require('./herald');

module.exports = {
  ...base,
  name: 'herald-uncoalesced',
  describe: () => ({ ...base.describe(), coalesce: 'off' }),
};
