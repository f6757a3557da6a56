-- Removes a node's record (a clean shutdown).
--
-- ARGV[1] node id
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
prune(now_ms())
return 1
