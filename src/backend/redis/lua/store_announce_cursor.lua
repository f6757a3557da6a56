-- Announcement cursor: moves a user's cursor to an id only when it is greater (byte-wise string order;
-- ids are UUID v7 strings, so greater = newer), and refreshes the key's expiry either way.
-- KEYS[1] the user's cursor (string)
-- ARGV[1] id, ARGV[2] ttl (s)
-- Returns the cursor before the call, or nil when there was none. Runs after announce_lib.lua.
local prev = redis.call('GET', KEYS[1])
if not prev or less(prev, ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return prev
