-- Sets a user's custom status and text (cleared when none is given). The status hash is kept while
-- the user has a live session and for the offline lifetime otherwise.
--
-- KEYS[1] user status hash, KEYS[2] user sessions zset
-- ARGV[1] status, ARGV[2] `1` when a text follows (else the text is cleared), ARGV[3] text,
-- ARGV[4] status lifetime while offline (ms)
-- Returns 1.
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'text', ARGV[3])
else
  redis.call('HDEL', KEYS[1], 'text')
end
if redis.call('ZCOUNT', KEYS[2], after(now), '+inf') > 0 then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
