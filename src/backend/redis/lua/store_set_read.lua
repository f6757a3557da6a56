-- Read pointer: moves a user's pointer in a room forward to a seq, never back.
-- KEYS[1] the user's read-pointer hash (room -> seq)
-- ARGV[1] room, ARGV[2] seq (decimal)
-- Returns the pointer after the call (integer).
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
local seq = tonumber(ARGV[2])
if seq > cur then
  -- Store the caller's decimal string as is (Lua would print a large number as 1e+15).
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return seq
end
return cur
