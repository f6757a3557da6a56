-- Announcements: stores one, drops the expired ones (Redis clock), and keeps at most ARGV[3], the
-- smallest ids going first (ids are UUID v7 strings: byte order = time order).
-- KEYS[1] the announcements hash (id -> announcement JSON, with `expires` unix ms or null)
-- ARGV[1] id, ARGV[2] announcement JSON, ARGV[3] most kept
-- Returns the number of announcements removed. Runs after announce_lib.lua.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local removed = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, a = pcall(cjson.decode, all[i + 1])
  if ok and type(a) == 'table' and type(a.expires) == 'number' and a.expires <= now then
    removed = removed + redis.call('HDEL', KEYS[1], all[i])
  end
end

redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])

local max = tonumber(ARGV[3])
local n = redis.call('HLEN', KEYS[1])
if n > max then
  local ids = redis.call('HKEYS', KEYS[1])
  table.sort(ids, less)
  for i = 1, n - max do
    removed = removed + redis.call('HDEL', KEYS[1], ids[i])
  end
end
return removed
