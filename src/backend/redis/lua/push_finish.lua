-- Finishes an outbox entry (XACK + XDEL) and, by mode, keeps its body as a timer (a retry) or in the
-- dead letters; one atomic step. An entry another claimer already finished is left alone (returns 0),
-- so a job handled twice is retried or dead-lettered once.
-- KEYS[1] outbox, KEYS[2] timers, KEYS[3] timer bodies, KEYS[4] dead letters
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] mode (done|retry|dead), ARGV[4] timer id, ARGV[5] after
-- (ms), ARGV[6] body, ARGV[7] dead letters kept
local seq = '-'
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if e[1] then
  local f = e[1][2]
  for i = 1, #f, 2 do
    if f[i] == 's' then seq = f[i + 1] end
  end
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 0 then
  return 0
end
if ARGV[3] == 'retry' then
  push_schedule(KEYS[2], KEYS[3], ARGV[4], ARGV[5], seq, ARGV[6])
elseif ARGV[3] == 'dead' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
end
return 1
