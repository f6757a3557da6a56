-- The live records.
--
-- Returns {now, then per live node: id, `<heartbeat> <JSON>`, expiry}, in id order.
local now = now_ms()
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. int(now), '+inf', 'WITHSCORES')
local out = { now }
for i = 1, #live, 2 do
  local v = redis.call('HGET', KEYS[2], live[i])
  if v then
    out[#out + 1] = live[i]
    out[#out + 1] = v
    out[#out + 1] = live[i + 1]
  end
end
return out
