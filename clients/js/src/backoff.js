// Jittered exponential backoff: about `initial` ms, doubling up to `max`, each delay moved by up to
// ±`jitter` (a fraction), so that clients dropped together do not come back together.

/**
 * @typedef {object} BackoffOptions
 * @property {number} [initial] first delay in ms (default 1000)
 * @property {number} [max] longest delay in ms (default 30000)
 * @property {number} [factor] growth per attempt (default 2)
 * @property {number} [jitter] fraction of randomness, plus or minus (default 0.2)
 * @property {number} [resetAfter] a session that lasted this long (ms) starts the backoff over (default 10000)
 */

export class Backoff {
  /** @param {BackoffOptions} [options] */
  constructor(options = {}) {
    this.initial = options.initial ?? 1000;
    this.max = options.max ?? 30000;
    this.factor = options.factor ?? 2;
    this.jitter = options.jitter ?? 0.2;
    this.resetAfter = options.resetAfter ?? 10000;
    this.attempt = 0;
  }

  /**
   * The delay before the next attempt, in ms; each call counts one attempt.
   * @param {() => number} [random] a source in [0, 1) (Math.random)
   */
  next(random = Math.random) {
    const base = Math.min(this.max, this.initial * this.factor ** this.attempt);
    this.attempt += 1;
    const spread = base * this.jitter * (2 * random() - 1);
    return Math.max(0, Math.round(base + spread));
  }

  /** Starts over (after a session that lasted `resetAfter`). */
  reset() {
    this.attempt = 0;
  }
}
