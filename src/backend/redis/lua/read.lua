-- History read: events with after < seq <= until, at most `limit`, none older than max_age (Redis clock),
-- plus the position and the oldest seq still served. Creates the meta like position.lua.
-- KEYS[1] meta hash, KEYS[2] stream
-- ARGV[1] after, ARGV[2] until (-1 = the last), ARGV[3] limit, ARGV[4] max age (ms), ARGV[5] fresh epoch,
-- ARGV[6] idle ttl (s) for a new meta.
-- Returns {epoch, seq, first_available, seq1, t1, frame1, filter1, seq2, ...}. Runs after
-- channel_lib.lua.
local epoch = channel_epoch(ARGV[5], ARGV[6])
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[4])

local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end
local function seq_of(entry)
  return tonumber(string.match(entry[1], '^(%d+)'))
end

-- The oldest entry within age (entries are in time order): scan from the start in pages.
local first = last + 1
local start = '-'
while true do
  local page = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 64)
  if #page == 0 then break end
  local found = false
  for _, e in ipairs(page) do
    if tonumber(field(e, 't')) >= cutoff then
      first = seq_of(e)
      found = true
      break
    end
  end
  if found or #page < 64 then break end
  start = '(' .. page[#page][1]
end

local out = {epoch, last, first}
local from = math.max(tonumber(ARGV[1]) + 1, first)
local upto = tonumber(ARGV[2])
if upto < 0 or upto > last then upto = last end
if from <= upto then
  local entries = redis.call('XRANGE', KEYS[2], from .. '-0', upto .. '-0', 'COUNT', tonumber(ARGV[3]))
  for _, e in ipairs(entries) do
    out[#out + 1] = seq_of(e)
    out[#out + 1] = field(e, 't')
    out[#out + 1] = field(e, 'f')
    out[#out + 1] = field(e, 'x') or ''
  end
end
return out
