// herald's client library: `connect` returns a Client that keeps one connection open and resumes
// every subscription after a reconnect. Plain ES modules, no dependencies, no build step.

import { Client } from './client.js';

export { Client } from './client.js';
export { Subscription } from './subscription.js';
export { HeraldError } from './errors.js';
export { Backoff } from './backoff.js';
export { closePolicy } from './policy.js';
export { FetchEventSource } from './eventsource.js';

/**
 * Connects to herald and keeps the connection: reconnects with jittered exponential backoff,
 * refreshes the token on 4002, stops on 4001/4003/4012.
 * @param {import('../index.js').ConnectOptions} options
 * @returns {Client}
 */
export function connect(options) {
  return new Client(options);
}
