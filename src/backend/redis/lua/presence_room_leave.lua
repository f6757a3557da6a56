-- Removes a session's entry from a room's presence. When it was the user's last live entry there,
-- the user leaves the room now; when the entry had expired already, the sweeper (which still finds the
-- user in the room's set) reports the leave.
--
-- KEYS[1] room present zset, KEYS[2] the user's entries in the room, KEYS[3] rooms zset,
-- KEYS[4] the session's rooms set
-- ARGV[1] room, ARGV[2] user, ARGV[3] session, ARGV[4] key grace (ms)
-- Returns 1 when this removed the user's last live entry in the room, else 0.
local now = now_ms()
local grace = tonumber(ARGV[4])
redis.call('SREM', KEYS[4], ARGV[1])
local score = redis.call('ZSCORE', KEYS[2], ARGV[3])
if not score then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
if settle_room_user(KEYS[1], KEYS[2], ARGV[2], grace) then
  settle_room(KEYS[1], KEYS[3], ARGV[1], grace)
  return 0
end
if tonumber(score) > now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  settle_room(KEYS[1], KEYS[3], ARGV[1], grace)
  return 1
end
return 0
