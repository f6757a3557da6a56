-- What the sweeper has to look at: users and rooms whose score (latest session expiry, earliest
-- user's room expiry) has passed.
--
-- KEYS[1] online zset, KEYS[2] rooms zset
-- ARGV[1] most of each to return
-- Returns {users, rooms}.
local now = now_ms()
return {
  redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, ARGV[1]),
  redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now), 'LIMIT', 0, ARGV[1]),
}
