-- KEYS[1] timers, KEYS[2] timer bodies; ARGV[1] id, ARGV[2] after (ms), ARGV[3] body.
return push_schedule(KEYS[1], KEYS[2], ARGV[1], ARGV[2], '-', ARGV[3])
