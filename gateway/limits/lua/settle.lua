-- Settle a call's reservation to what it used, and free its concurrency slots.
-- KEYS: the call's windows. ARGV: lease member, then per window its kind, limit and the
-- difference between what the call used and what it reserved.
for i = 1, #KEYS do
  local at = 2 + (i - 1) * 3
  local kind, limit, change = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if kind == 'rate' and change ~= 0 then
    local level = math.min(limit, bucket_level(KEYS[i], limit) - change)
    if level < limit then
      store_level(KEYS[i], limit, level)
    else
      redis.call('DEL', KEYS[i])
    end
  elseif kind == 'quota' and change ~= 0 then
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[at + 2]) end
  elseif kind == 'slots' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
end
return 1
