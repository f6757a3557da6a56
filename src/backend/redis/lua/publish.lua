-- Stores one event and fans it out, atomically: seq from the channel's meta hash (a fresh epoch when the
-- meta is missing, i.e. the channel is new or Redis lost it), XADD with id `seq-0`, MAXLEN trim, idle
-- expiry, and PUBLISH of a payload carrying epoch and seq. Every node sees a channel in seq order.
--
-- KEYS[1] meta hash, KEYS[2] stream
-- ARGV[1] pubsub channel, ARGV[2] frame head (`{"type":"event","channel":"…",`), ARGV[3] body
-- (`"id":…,"ts":…}`), ARGV[4] maxlen, ARGV[5] idle ttl (s), ARGV[6] fresh epoch, ARGV[7] event type,
-- ARGV[8] live-delivery filter (JSON or empty)
-- Returns {epoch, seq}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local frame = ARGV[2] .. '"seq":' .. seq .. ',"epoch":"' .. epoch .. '",' .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', '=', ARGV[4], seq .. '-0', 'f', frame, 't', now, 'x', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[1], '1 ' .. seq .. ' ' .. epoch .. ' ' .. ARGV[7] .. '\n' .. ARGV[8] .. '\n' .. frame)
return {epoch, seq}
