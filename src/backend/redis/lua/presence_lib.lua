-- Helpers prepended to every other presence_*.lua script (each script is this file followed by its
-- own text, loaded as one script). Times are unix ms from Redis `TIME`, the one clock every node
-- shares. Integers passed to commands go through `int` so they never reach Redis in exponent form.
--
-- A user's sessions: a sorted set (session -> expiry) and a hash (session -> details JSON) that always
-- hold the same session ids. The online sorted set holds user -> their latest session expiry: a user
-- with a live session is always in it, and whoever removes a user from it reports them offline.
-- Room presence: per room, a sorted set user -> their latest entry's expiry, and per room and user a
-- sorted set session -> expiry; the rooms sorted set holds room -> the lowest score of its users.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(x)
  return string.format('%d', x)
end

-- The score range "strictly after now": what is still live.
local function after(now)
  return string.format('(%d', now)
end

-- The highest score of a sorted set, or nil when it is empty.
local function top(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'REV', 'WITHSCORES')
  if r[2] then
    return tonumber(r[2])
  end
  return nil
end

-- The lowest score of a sorted set, or nil when it is empty.
local function bottom(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if r[2] then
    return tonumber(r[2])
  end
  return nil
end

-- The safety-net expiries of per-user, per-room and per-session keys (their latest entry + the key
-- grace) are rounded up to the end of an hour: a key's expiry only has to move when the hour its
-- entries' expiry + grace falls in changes, so a heartbeat, which extends entries by seconds, leaves
-- it alone almost every time (see `same_slot`). Every expiry set on such a key goes through here.
local SLOT = 3600000
local function slot_end(at)
  return math.ceil(at / SLOT) * SLOT
end

-- Whether an entry whose expiry moves from `from` to `to` leaves its key's expiry where it is: every
-- script keeps a key expiring at or after slot_end(its latest entry + grace), so when both fall in
-- one slot the key already lasts long enough (and even when that did not hold, say for a key an
-- older build wrote, the key still outlives its entries by the grace less one slot).
local function same_slot(from, to, grace)
  return slot_end(from + grace) == slot_end(to + grace)
end

-- Pushes a key's expiry out to `at` unless it already expires later (a missing key stays missing).
local function expire_at_least(key, at)
  local t = redis.call('PEXPIRETIME', key)
  if t == -1 or (t >= 0 and t < at) then
    redis.call('PEXPIREAT', key, int(at))
  end
end

-- Drops a user's sessions that expired by `now`, with their details.
local function drop_expired(sessions, devices, now)
  local gone = redis.call('ZRANGEBYSCORE', sessions, '-inf', int(now))
  for i = 1, #gone do
    redis.call('HDEL', devices, gone[i])
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', sessions, '-inf', int(now))
  end
end

-- After a user's sessions changed: their online score and their keys' expiry follow the latest
-- session. Returns that expiry, or nil when no session is left (the caller decides what going
-- offline means and who reports it).
local function settle_user(sessions, devices, online, user, grace)
  local latest = top(sessions)
  if latest then
    redis.call('ZADD', online, int(latest), user)
    redis.call('PEXPIREAT', sessions, int(slot_end(latest + grace)))
    redis.call('PEXPIREAT', devices, int(slot_end(latest + grace)))
  end
  return latest
end

-- Records when a user went offline; their status and last_seen are then kept for `forget` ms.
local function went_offline(status, now, forget)
  redis.call('HSET', status, 'last_seen', int(now))
  redis.call('PEXPIRE', status, int(forget))
end

-- After a user's entries in a room changed: their score in the room follows their latest entry.
-- Returns it, or nil when no entry is left.
local function settle_room_user(present, entries, user, grace)
  local latest = top(entries)
  if latest then
    redis.call('ZADD', present, int(latest), user)
    redis.call('PEXPIREAT', entries, int(slot_end(latest + grace)))
  end
  return latest
end

-- After a room's users changed: the room's score in the rooms set is its earliest user's expiry (when
-- the sweeper must look at it next); a room with no one left leaves the set.
local function settle_room(present, rooms, room, grace)
  local first = bottom(present)
  if first then
    redis.call('ZADD', rooms, int(first), room)
    redis.call('PEXPIREAT', present, int(slot_end(top(present) + grace)))
  else
    redis.call('ZREM', rooms, room)
  end
end

