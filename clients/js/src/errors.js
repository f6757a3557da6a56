// The error every failed op rejects with: the server's `error.code` and `message`, and for a
// failed publish the `action` the server asks for ("rollback": remove the optimistic message).

export class HeraldError extends Error {
  /**
   * @param {string} code the server's error code (`not_member`, `forbidden`, …) or one of the
   *   client's own: `timeout`, `closed`, `disconnected`, `receive_only`, `network`
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

  /**
   * The error a refusal from the server stands for: an error reply to an op, or the body of an
   * HTTP error (both `{error: {code, message}}`, a reply also its `action`).
   * @param {any} reply
   * @param {string} fallback the message when the server gave none
   */
  static fromReply(reply, fallback) {
    const e = reply?.error ?? {};
    return new HeraldError(e.code ?? 'internal', e.message ?? fallback, { action: reply?.action, reply });
  }
}
