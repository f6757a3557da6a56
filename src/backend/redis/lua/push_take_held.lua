-- Takes what a key holds ({count, last body}, or nil) and, when it held any, opens the next window.
-- KEYS[1] gate, KEYS[2] held; ARGV[1] window (ms).
local n = redis.call('HGET', KEYS[2], 'n')
local b = redis.call('HGET', KEYS[2], 'b')
redis.call('DEL', KEYS[2])
if n and b then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return {tonumber(n), b}
end
return false
