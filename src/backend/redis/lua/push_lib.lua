-- The push outbox's shared steps (push_*.lua and publish.lua run after this file).

-- Keeps `body` (with `seq`, or '-') as timer `id` in the sorted set `timers` (due `after_ms` from the
-- Redis clock) and the hash `bodies`, unless that timer is pending. Returns 1 when added.
local function push_schedule(timers, bodies, id, after_ms, seq, body)
  if redis.call('ZSCORE', timers, id) then
    return 0
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', timers, string.format('%.0f', now + tonumber(after_ms)), id)
  redis.call('HSET', bodies, id, seq .. ' ' .. body)
  return 1
end

-- Queues `body` with `seq` (or '-') in the outbox stream.
local function push_enqueue(outbox, seq, body)
  redis.call('XADD', outbox, '*', 'b', body, 's', seq)
end
