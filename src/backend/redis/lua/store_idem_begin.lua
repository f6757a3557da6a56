-- Claims an idempotency key (the Idempotency trait's contract in backend/mod.rs). The key is a hash:
-- `id` (the event id of its first claim), `lease` (until when the current publisher holds it, unix ms
-- of the Redis clock), `reply` (the first reply, once done) and `c:<channel>` = `<seq> <epoch>` for each
-- channel stored under it (written by publish.lua in the same step as the append).
--
-- KEYS[1] the key
-- ARGV[1] the event id a new claim records, ARGV[2] lease (ms), ARGV[3] ttl of a new record (ms)
-- Returns {'done', reply}, {'pending'} (a live lease), or {'claimed', event id}: a new key, or one whose
-- lease lapsed (its publisher stopped), taken over with the first claim's id.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'reply', 'id', 'lease')
if f[1] then
  return {'done', f[1]}
end
local lease = string.format('%d', now + tonumber(ARGV[2]))
if f[2] then
  if tonumber(f[3] or '0') > now then
    return {'pending'}
  end
  redis.call('HSET', KEYS[1], 'lease', lease)
  return {'claimed', f[2]}
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'lease', lease)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'claimed', ARGV[1]}
