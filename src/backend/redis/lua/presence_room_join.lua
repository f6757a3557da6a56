-- Adds or refreshes a session's entry in a room's presence. The user's expired entries there are
-- dropped first, so the reply tells whether the user had a live entry before.
--
-- KEYS[1] room present zset, KEYS[2] the user's entries in the room, KEYS[3] rooms zset,
-- KEYS[4] the session's rooms set
-- ARGV[1] room, ARGV[2] user, ARGV[3] session, ARGV[4] ttl (ms), ARGV[5] key grace (ms)
-- Returns 1 when the user had no live entry in the room before, else 0.
local now = now_ms()
local grace = tonumber(ARGV[5])
local exp = now + tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
local was_absent = redis.call('ZCARD', KEYS[2]) == 0
redis.call('ZADD', KEYS[2], int(exp), ARGV[3])
settle_room_user(KEYS[1], KEYS[2], ARGV[2], grace)
settle_room(KEYS[1], KEYS[3], ARGV[1], grace)
redis.call('SADD', KEYS[4], ARGV[1])
expire_at_least(KEYS[4], slot_end(exp + grace))
if was_absent then
  return 1
end
return 0
