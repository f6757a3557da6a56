-- Removes a session. When it was the user's last live session the user goes offline now: removed
-- from the online zset, last_seen recorded. When the session had expired already, the user went
-- offline when it did, and the sweeper (which still finds the user in the online zset) reports it.
--
-- KEYS[1] user sessions zset, KEYS[2] user devices hash, KEYS[3] user status hash, KEYS[4] online zset
-- ARGV[1] user, ARGV[2] session, ARGV[3] key grace (ms), ARGV[4] status lifetime after offline (ms)
-- Returns last_seen (unix ms) when this removed the user's last live session, else nil.
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score then
  return false
end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
drop_expired(KEYS[1], KEYS[2], now)
if settle_user(KEYS[1], KEYS[2], KEYS[4], ARGV[1], tonumber(ARGV[3])) then
  return false
end
if tonumber(score) > now then
  redis.call('ZREM', KEYS[4], ARGV[1])
  went_offline(KEYS[3], now, tonumber(ARGV[4]))
  return now
end
return false
