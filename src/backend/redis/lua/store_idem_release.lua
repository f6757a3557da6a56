-- Idempotency release: a failed publish ends its lease, so the next claim takes the key over at once.
-- The record stays (its event id and the channels already stored under it are what make the retry
-- store nothing twice); a done key, or one that expired, is left alone.
-- KEYS[1] the idempotency key (a hash: see store_idem_begin.lua)
-- Returns 1 when a lease was ended, 0 otherwise.
if redis.call('HEXISTS', KEYS[1], 'id') == 1 and redis.call('HEXISTS', KEYS[1], 'reply') == 0 then
  redis.call('HSET', KEYS[1], 'lease', 0)
  return 1
end
return 0
