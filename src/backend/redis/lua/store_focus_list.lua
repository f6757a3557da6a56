-- Focus: drops a room's expired entries (Redis clock) and lists the live ones.
-- KEYS[1] the room's focus sorted set (`user|session` scored by expiry, unix ms)
-- Returns the live members (`user|session`), in score order.
return live_focus(KEYS[1], redis_now())
