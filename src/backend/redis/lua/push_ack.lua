-- Moves `user`'s ack position on a channel forward (never back). KEYS[1] the channel's acks hash;
-- ARGV[1] user, ARGV[2] seq, ARGV[3] idle expiry (s).
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
