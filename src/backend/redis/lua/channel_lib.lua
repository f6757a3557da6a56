-- A channel's meta, shared by publish.lua, position.lua and read.lua so they cannot disagree on how a
-- channel starts. Each of those scripts is this file followed by its own text.

-- The epoch of the channel whose meta hash is KEYS[1] and stream KEYS[2]. When the meta is missing (a new
-- channel, or Redis lost it), it starts one: epoch `fresh`, seq 0, the stream dropped (events of a lost
-- epoch must not be served under the new one), and an idle expiry of `ttl` s when given.
local function channel_epoch(fresh, ttl)
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = fresh
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
    if ttl then
      redis.call('EXPIRE', KEYS[1], ttl)
    end
  end
  return epoch
end

