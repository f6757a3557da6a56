-- The burst gate of one key: opens a window and returns 1 when none is open; else holds the push
-- (count + the last body) and, for the first held, sets the summary timer due when the window closes.
-- KEYS[1] gate, KEYS[2] held, KEYS[3] timers, KEYS[4] timer bodies
-- ARGV[1] window (ms), ARGV[2] body, ARGV[3] summary timer id, ARGV[4] summary body
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 1
end
local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('HSET', KEYS[2], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[2], 86400000)
if n == 1 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = 0 end
  push_schedule(KEYS[3], KEYS[4], ARGV[3], ttl, '-', ARGV[4])
end
return 0
