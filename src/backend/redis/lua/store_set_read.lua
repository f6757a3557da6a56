-- Read pointer: moves a user's pointer in a room forward to a seq, never back.
-- KEYS[1] the user's read-pointer hash (room -> seq)
-- ARGV[1] room, ARGV[2] seq (decimal)
-- Returns the pointer after the call (integer).
return read_forward(KEYS[1], ARGV[1], ARGV[2])
