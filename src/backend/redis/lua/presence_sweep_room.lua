-- Expires one room's presence entries: each user whose latest entry there has passed loses their
-- expired entries and, when none is left, leaves the room's set here (so exactly one sweeper reports
-- them); the room's score then follows its earliest remaining user.
--
-- Per-user entry keys are built from the pieces of their names that `keys.rs` gives.
--
-- KEYS[1] room present zset, KEYS[2] rooms zset
-- ARGV[1] room, ARGV[2..4] room entries key = ARGV[2]..room..ARGV[3]..user..ARGV[4], ARGV[5] key grace
-- (ms), ARGV[6] most users to look at
-- Returns the users whose presence in the room ended.
local now = now_ms()
local grace = tonumber(ARGV[5])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, ARGV[6])
local left = {}
for _, user in ipairs(due) do
  local entries = ARGV[2] .. ARGV[1] .. ARGV[3] .. user .. ARGV[4]
  redis.call('ZREMRANGEBYSCORE', entries, '-inf', int(now))
  if not settle_room_user(KEYS[1], entries, user, grace) then
    redis.call('ZREM', KEYS[1], user)
    left[#left + 1] = user
  end
end
settle_room(KEYS[1], KEYS[2], ARGV[1], grace)
return left
