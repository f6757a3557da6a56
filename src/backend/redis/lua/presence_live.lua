-- Reads a sorted set scored by expiry: what is live now.
--
-- KEYS[1] sorted set (member -> expiry, unix ms)
-- ARGV[1] `count` or `members`
-- Returns the number of live members, or the live members (in score order).
local now = now_ms()
if ARGV[1] == 'count' then
  return redis.call('ZCOUNT', KEYS[1], after(now), '+inf')
end
return redis.call('ZRANGEBYSCORE', KEYS[1], after(now), '+inf')
