-- Settle a call's reservation to what it used, and free its concurrency slots.
-- KEYS: the call's windows. ARGV: lease member, then per window its kind, limit, the
-- difference between what the call used and what it reserved, and (quotas) the unix time
-- its counter expires: a window that has ended since is gone at once, and a usage charged
-- without a reservation (a batch billed when it completes) starts the counter if need be.
for i = 1, #KEYS do
  local at = 2 + (i - 1) * 4
  local kind, limit, change = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if kind == 'rate' and change ~= 0 then
    local level = math.min(limit, bucket_level(KEYS[i], limit) - change)
    if level < limit then
      store_level(KEYS[i], limit, level)
    else
      redis.call('DEL', KEYS[i])
    end
  elseif kind == 'quota' and change ~= 0 then
    redis.call('INCRBY', KEYS[i], ARGV[at + 2])
    redis.call('EXPIREAT', KEYS[i], ARGV[at + 3])
  elseif kind == 'slots' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
end
return 1
