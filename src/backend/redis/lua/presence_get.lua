-- One user's presence as stored: status fields and the details of the live sessions (expired ones,
-- even not swept yet, are left out).
--
-- KEYS[1] user sessions zset, KEYS[2] user devices hash, KEYS[3] user status hash
-- Returns {now, status, text, last_seen, details JSON of each live session...} (missing fields nil).
local now = now_ms()
local st = redis.call('HMGET', KEYS[3], 'status', 'text', 'last_seen')
local out = { now, st[1], st[2], st[3] }
local live = redis.call('ZRANGEBYSCORE', KEYS[1], after(now), '+inf')
for i = 1, #live do
  local d = redis.call('HGET', KEYS[2], live[i])
  if d then
    out[#out + 1] = d
  end
end
return out
