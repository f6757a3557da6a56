-- A channel's position, creating its meta (fresh epoch, seq 0) when missing.
-- KEYS[1] meta hash, KEYS[2] stream; ARGV[1] fresh epoch, ARGV[2] idle ttl (s) for a new meta.
-- Returns {epoch, seq}. Runs after channel_lib.lua.
local epoch = channel_epoch(ARGV[1], ARGV[2])
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'seq'))}
