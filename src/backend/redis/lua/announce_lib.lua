-- Announcement ids in order, shared by store_announce_add.lua and store_announce_cursor.lua. Each of
-- those scripts is this file followed by its own text.

-- Byte-wise string order (Lua's `<` follows the server's locale). Ids are UUID v7 strings, so byte
-- order is time order.
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

