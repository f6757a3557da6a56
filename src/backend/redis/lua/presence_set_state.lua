-- Sets the app state in a session's details, when the session exists.
--
-- KEYS[1] user sessions zset, KEYS[2] user devices hash
-- ARGV[1] session, ARGV[2] state (`foreground` | `background`)
-- Returns 1 when the session was found, else 0.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then
  return 0
end
local info = cjson.decode(raw)
info.state = ARGV[2]
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(info))
return 1
