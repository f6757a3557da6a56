-- Extends many sessions at once (one node's heartbeat, in chunks): each session that is still live
-- gets `now + ttl` (never less than it has: GT), its user's online score follows, and so do the live
-- room entries of the session (found through its rooms set; entries gone or expired are dropped from
-- that set). Expired sessions and entries are never revived here (the sweeper reports them): the
-- reply names the sessions not found live, and the node registers those still connected again.
--
-- A live session costs four calls (its check and extension, its user's online score, its rooms set)
-- and each of its rooms three more (the entry's check and extension, the user's score there). Scores
-- move with ZADD GT, which leaves the latest entry's: nothing outlives now + ttl. Keys' expiries move
-- only when their hour changes (`same_slot`), and each room is settled once per call.
--
-- Room keys are only known once the session's rooms set is read, so they are built here from the
-- pieces of their names that `keys.rs` gives (one Redis, not Cluster: see presence.rs).
--
-- KEYS[1] online zset, KEYS[2] rooms zset, then per session i (from 0): KEYS[3+3i] user sessions zset,
-- KEYS[4+3i] user devices hash, KEYS[5+3i] the session's rooms set
-- ARGV[1] ttl (ms), ARGV[2] key grace (ms), ARGV[3], ARGV[4] room present key = ARGV[3]..room..ARGV[4],
-- ARGV[5..7] room entries key = ARGV[5]..room..ARGV[6]..user..ARGV[7], then per session i:
-- ARGV[8+2i] user, ARGV[9+2i] session
-- Returns the indexes (from 0, in this call's order) of the sessions not found live.
local now = now_ms()
local grace = tonumber(ARGV[2])
local exp = now + tonumber(ARGV[1])
-- What every extension writes, computed and formatted once.
local keys_at = slot_end(exp + grace)
local exps, keys_exp = int(exp), int(keys_at)
local missing = {}
-- Rooms whose users' scores moved, settled once at the end (a chunk's sessions often share rooms).
local touched = {}
local n = (#KEYS - 2) / 3
for i = 0, n - 1 do
  local sessions, devices, index = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local user, session = ARGV[8 + 2 * i], ARGV[9 + 2 * i]
  local score = tonumber(redis.call('ZSCORE', sessions, session))
  if score and score > now then
    redis.call('ZADD', sessions, 'XX', 'GT', exps, session)
    redis.call('ZADD', KEYS[1], 'GT', exps, user)
    if not same_slot(score, exp, grace) then
      redis.call('PEXPIREAT', sessions, keys_exp, 'GT')
      redis.call('PEXPIREAT', devices, keys_exp, 'GT')
      expire_at_least(index, keys_at)
    end
  else
    missing[#missing + 1] = i
    expire_at_least(index, keys_at)
  end
  local rooms = redis.call('SMEMBERS', index)
  for _, room in ipairs(rooms) do
    local present = touched[room] or ARGV[3] .. room .. ARGV[4]
    local entries = ARGV[5] .. room .. ARGV[6] .. user .. ARGV[7]
    local s = tonumber(redis.call('ZSCORE', entries, session))
    if s and s > now then
      redis.call('ZADD', entries, 'XX', 'GT', exps, session)
      redis.call('ZADD', present, 'GT', exps, user)
      if not same_slot(s, exp, grace) then
        redis.call('PEXPIREAT', entries, keys_exp, 'GT')
      end
      touched[room] = present
    else
      redis.call('SREM', index, room)
    end
  end
end
for room, present in pairs(touched) do
  settle_room(present, KEYS[2], room, grace)
end
return missing
