// A tiny event emitter: `on` returns the function that removes the listener. A listener that throws
// is reported on `error` (or to the console when nobody listens there) and never stops the others.

/** @template {Record<string, any>} Events */
export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /**
   * Adds a listener for `name`.
   * @param {string} name
   * @param {Function} fn
   * @returns {() => void} removes the listener
   */
  on(name, fn) {
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(fn);
    return () => this.off(name, fn);
  }

  /**
   * Adds a listener called at most once.
   * @param {string} name
   * @param {Function} fn
   * @returns {() => void}
   */
  once(name, fn) {
    const off = this.on(name, (...args) => {
      off();
      return fn(...args);
    });
    return off;
  }

  /**
   * Removes a listener.
   * @param {string} name
   * @param {Function} fn
   */
  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  /**
   * Calls every listener of `name` in order; returns what they returned (promises included), so a
   * caller can wait for asynchronous handlers.
   * @param {string} name
   * @param {...any} args
   * @returns {any[]}
   */
  emit(name, ...args) {
    const set = this._listeners.get(name);
    if (!set || set.size === 0) return [];
    const results = [];
    for (const fn of [...set]) {
      try {
        results.push(fn(...args));
      } catch (err) {
        this._listenerFailed(name, err);
      }
    }
    return results;
  }

  /** @param {string} name @param {unknown} err */
  _listenerFailed(name, err) {
    if (name !== 'error' && this._listeners.get('error')?.size) this.emit('error', err);
    else console.error(`herald: a '${name}' listener threw`, err);
  }
}
