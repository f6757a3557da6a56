-- Turns due timers into outbox entries, atomically (a timer becomes an entry once).
-- KEYS[1] timers, KEYS[2] timer bodies, KEYS[3] outbox; ARGV[1] most to move. Returns how many.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, ARGV[1])
for _, id in ipairs(ids) do
  local v = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if v then
    local sp = string.find(v, ' ', 1, true)
    push_enqueue(KEYS[3], string.sub(v, 1, sp - 1), string.sub(v, sp + 1))
  end
end
return #ids
