-- Focus: adds or refreshes a session's focus on a room until now + ttl (Redis clock), drops expired
-- entries, and expires the whole key a little past its longest-lived entry.
-- KEYS[1] the room's focus sorted set (`user|session` scored by expiry, unix ms)
-- ARGV[1] member `user|session`, ARGV[2] ttl (ms), ARGV[3] slack past the last expiry (ms)
-- Returns the number of live entries.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local until_ms = tonumber(last[2]) - now + tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.max(until_ms, 1)))
return redis.call('ZCARD', KEYS[1])
