-- A channel's position, creating its meta (fresh epoch, seq 0) when missing.
-- KEYS[1] meta hash, KEYS[2] stream; ARGV[1] fresh epoch, ARGV[2] idle ttl (s) for a new meta.
-- Returns {epoch, seq}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'seq'))}
