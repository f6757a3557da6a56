-- Records (or refreshes) a node until now + ttl.
--
-- ARGV[1] node id, ARGV[2] what it says (JSON), ARGV[3] ttl (ms)
-- Returns the heartbeat's time.
local now = now_ms()
redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[3])), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], int(now) .. ' ' .. ARGV[2])
prune(now)
return now
