-- Focus: drops a room's expired entries (Redis clock) and lists the live ones.
-- KEYS[1] the room's focus sorted set (`user|session` scored by expiry, unix ms)
-- Returns the live members (`user|session`), in score order.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
return redis.call('ZRANGE', KEYS[1], 0, -1)
