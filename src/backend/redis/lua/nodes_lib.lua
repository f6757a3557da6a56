-- Helpers prepended to the node registry's scripts (nodes_*.lua). The registry: a sorted set node id
-- -> when its record lapses, and a hash node id -> `<last heartbeat> <what the node said, JSON>`, both
-- under one hash tag. Times are unix ms from Redis `TIME`, the clock every node shares.
--
-- KEYS[1] the sorted set, KEYS[2] the hash (every nodes_*.lua script).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(x)
  return string.format('%d', x)
end

-- Drops the records that lapsed by `now`, then lets both keys expire with the last live record (so
-- a registry whose nodes all went leaves nothing behind).
local function prune(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now))
  for i = 1, #gone do
    redis.call('HDEL', KEYS[2], gone[i])
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
  end
  local last = redis.call('ZRANGE', KEYS[1], 0, 0, 'REV', 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', KEYS[1], last[2])
    redis.call('PEXPIREAT', KEYS[2], last[2])
  end
end
