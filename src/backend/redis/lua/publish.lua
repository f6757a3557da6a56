-- Stores one event and fans it out, atomically: seq from the channel's meta hash (a fresh epoch when the
-- meta is missing, i.e. the channel is new or Redis lost it), XADD with id `seq-0`, MAXLEN trim, idle
-- expiry, the unread step of a countable room event (when given), and PUBLISH of a payload carrying
-- epoch and seq. Every node sees a channel in seq order. Runs after unread_lib.lua, channel_lib.lua and
-- push_lib.lua.
--
-- KEYS[1] meta hash, KEYS[2] stream
-- ARGV[1] pubsub channel, ARGV[2] frame head (`{"type":"event","channel":"…",`), ARGV[3] body
-- (`"id":…,"ts":…}`), ARGV[4] maxlen, ARGV[5] idle ttl (s), ARGV[6] fresh epoch, ARGV[7] event type,
-- ARGV[8] live-delivery filter (JSON or empty), ARGV[9] the idempotency record this publish is made
-- under (`Outgoing::dedupe`; empty: none): when it already holds this channel, nothing is stored and
-- the position recorded there is returned; otherwise the append records it there (a record that
-- expired is not recreated). Undeclared, like the read pointers below.
-- ARGV[10] push step (`PushStep` in backend/mod.rs): '' none, 'now' (queued in the outbox stream
-- ARGV[11]) or 'after' (a timer in the sorted set ARGV[11] and the hash ARGV[12], id ARGV[13], due
-- ARGV[14] ms from now), ARGV[15] its body; the entry or timer carries the seq. Undeclared keys too.
--
-- The unread step (`UnreadStep` in backend/mod.rs), only when KEYS[3] is given; the same effect as the
-- Unread trait's mark_countable, set_read for the sender, focused, and set_read for each focused user but the
-- sender, in one step:
-- KEYS[3] the room's countable sorted set, KEYS[4] the room's focus sorted set, KEYS[5] the sender's
-- read-pointer hash (absent: no sender)
-- ARGV[16] keep (>= 1), ARGV[17] countable idle ttl (s), ARGV[18] room, ARGV[19] sender (when KEYS[5]),
-- ARGV[20] ARGV[21] the read-pointer hash name of a user is ARGV[20] .. user .. ARGV[21]: the pieces
-- `keys.rs` gives, since focused users are only known in here (so those keys are not declared: one
-- Redis, not Cluster, like the presence heartbeat).
--
-- Returns {epoch, seq}.
local dedupe = ARGV[9]
local stored_as = 'c:' .. ARGV[1]
if dedupe ~= '' then
  local done = redis.call('HGET', dedupe, stored_as)
  if done then
    local s, e = string.match(done, '^(%d+) (.+)$')
    return {e, tonumber(s)}
  end
end
-- (No expiry for a new meta here: both keys get theirs below.)
local epoch = channel_epoch(ARGV[6])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local now = redis_now()
local frame = ARGV[2] .. '"seq":' .. seq .. ',"epoch":"' .. epoch .. '",' .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', '=', ARGV[4], seq .. '-0', 'f', frame, 't', now, 'x', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
local seq_s = string.format('%d', seq)
if dedupe ~= '' and redis.call('EXISTS', dedupe) == 1 then
  redis.call('HSET', dedupe, stored_as, seq_s .. ' ' .. epoch)
end
if ARGV[10] == 'now' then
  push_enqueue(ARGV[11], seq_s, ARGV[15])
elseif ARGV[10] == 'after' then
  push_schedule(ARGV[11], ARGV[12], ARGV[13], ARGV[14], seq_s, ARGV[15])
end
if KEYS[3] then
  local room = ARGV[18]
  mark_countable(KEYS[3], seq_s, ARGV[16], ARGV[17])
  local sender = nil
  if KEYS[5] then
    sender = ARGV[19]
    read_forward(KEYS[5], room, seq_s)
  end
  local done = {}
  for _, entry in ipairs(live_focus(KEYS[4], now)) do
    -- `user|session`; user ids never contain `|` (Unread's `focused` splits at the first one too).
    local user = string.match(entry, '^([^|]*)|')
    if user and user ~= sender and not done[user] then
      done[user] = true
      read_forward(ARGV[20] .. user .. ARGV[21], room, seq_s)
    end
  end
end
redis.call('PUBLISH', ARGV[1], '1 ' .. seq .. ' ' .. epoch .. ' ' .. ARGV[7] .. '\n' .. ARGV[8] .. '\n' .. frame)
return {epoch, seq}
