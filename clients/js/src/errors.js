// The error every failed op rejects with: the server's `error.code` and `message`, and for a
// failed publish the `action` the server asks for ("rollback": remove the optimistic message).

export class HeraldError extends Error {
  /**
   * @param {string} code the server's error code (`not_member`, `forbidden`, …) or one of the
   *   client's own: `timeout`, `closed`, `disconnected`, `receive_only`
   * @param {string} message
   * @param {{action?: string, reply?: object}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'HeraldError';
    /** @type {string} */
    this.code = code;
    /** @type {string | undefined} */
    this.action = extra.action;
    /** @type {object | undefined} */
    this.reply = extra.reply;
  }
}
