-- Registers or refreshes a session. The user's expired sessions are dropped first, so the reply tells
-- whether the user had a live session before: of any set of concurrent first sessions (on any nodes),
-- exactly one gets 1.
--
-- KEYS[1] user sessions zset, KEYS[2] user devices hash, KEYS[3] user status hash, KEYS[4] online zset
-- ARGV[1] user, ARGV[2] session, ARGV[3] session details (JSON), ARGV[4] ttl (ms), ARGV[5] key grace (ms)
-- Returns 1 when the user had no live session before, else 0.
local now = now_ms()
drop_expired(KEYS[1], KEYS[2], now)
local was_offline = redis.call('ZCARD', KEYS[1]) == 0
redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[4])), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
settle_user(KEYS[1], KEYS[2], KEYS[4], ARGV[1], tonumber(ARGV[5]))
-- Status and last_seen are kept while online; going offline gives them a lifetime again.
redis.call('PERSIST', KEYS[3])
if was_offline then
  return 1
end
return 0
