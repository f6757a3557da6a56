-- Unread: records a seq of a room as countable, keeping the newest `keep`, with an idle expiry.
-- KEYS[1] the room's countable sorted set
-- ARGV[1] seq, ARGV[2] keep (>= 1), ARGV[3] idle ttl (s)
mark_countable(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
return 1
