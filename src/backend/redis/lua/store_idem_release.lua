-- Idempotency release (compare-and-delete): a failed publish gives its key back, but only while the
-- key still holds the pending marker; a stored first reply is never deleted.
-- KEYS[1] the idempotency key
-- ARGV[1] the pending marker
-- Returns 1 when the key was deleted, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
