-- Expires one user's sessions. When none is left, removes the user from the online zset and, only
-- when that removal happened here (ZREM returned 1), reports them offline: of sweepers running at once
-- on every node, exactly one reports a user. Otherwise the online score is set to the latest session.
--
-- KEYS[1] user sessions zset, KEYS[2] user devices hash, KEYS[3] user status hash, KEYS[4] online zset
-- ARGV[1] user, ARGV[2] key grace (ms), ARGV[3] status lifetime after offline (ms)
-- Returns last_seen (unix ms) when this sweep took the user offline, else nil.
local now = now_ms()
drop_expired(KEYS[1], KEYS[2], now)
if settle_user(KEYS[1], KEYS[2], KEYS[4], ARGV[1], tonumber(ARGV[2])) then
  return false
end
if redis.call('ZREM', KEYS[4], ARGV[1]) == 1 then
  went_offline(KEYS[3], now, tonumber(ARGV[3]))
  return now
end
return false
