-- Unread bookkeeping, shared by the Unread scripts (store_mark_countable.lua, store_set_read.lua,
-- store_focus_list.lua) and the folded step of publish.lua, so the two paths cannot drift apart. Each
-- of those scripts is this file followed by its own text.

-- Records `seq` as countable in a room's sorted set (score = member = seq), keeps the newest `keep`
-- (ranks 0 .. len-keep-1 are the oldest beyond them) and refreshes the key's idle expiry (`ttl` s).
local function mark_countable(key, seq, keep, ttl)
  redis.call('ZADD', key, seq, seq)
  redis.call('ZREMRANGEBYRANK', key, 0, -tonumber(keep) - 1)
  redis.call('EXPIRE', key, ttl)
end

-- Moves a user's read pointer (field `room` of the hash `key`) forward to `seq`, a decimal string,
-- never back. Returns the pointer after the call.
local function read_forward(key, room, seq)
  local cur = tonumber(redis.call('HGET', key, room)) or 0
  local n = tonumber(seq)
  if n > cur then
    -- Store the decimal string as is (Lua would print a large number as 1e+15).
    redis.call('HSET', key, room, seq)
    return n
  end
  return cur
end

-- Drops a room's expired focus entries (`user|session` scored by expiry, unix ms of the Redis clock
-- `now`) and returns the live ones, in score order.
local function live_focus(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))
  return redis.call('ZRANGE', key, 0, -1)
end

-- Unix ms of the Redis clock.
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
