-- Check every window of a call and take its reservation from all of them, or from none.
-- KEYS: one per window. ARGV: lease member, lease seconds, then per window its kind, limit,
-- amount (slots: 1 to hold one, 0 to hold none) and (quotas) the unix time its counter
-- expires. Returns {0, level seen per window} when the call was admitted, else
-- {window index, seconds to wait (-1: never), level seen}.
local member, lease = ARGV[1], tonumber(ARGV[2])
local seen = {}
for i = 1, #KEYS do
  local at = 3 + (i - 1) * 4
  local kind, limit, amount = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if kind == 'rate' then
    local level = bucket_level(KEYS[i], limit)
    if amount > level then
      local wait = -1
      if amount <= limit then wait = (amount - level) * 60 / limit end
      return {i, tostring(wait), tostring(level)}
    end
    seen[i] = level
  elseif kind == 'quota' then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if used + amount > limit or used >= limit then return {i, '0', tostring(used)} end
    seen[i] = used
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local active = redis.call('ZCARD', KEYS[i])
    if amount > 0 and active >= limit then return {i, '0', tostring(active)} end
    seen[i] = active
  end
end
local reply = {0}
for i = 1, #KEYS do
  local at = 3 + (i - 1) * 4
  local kind, limit = ARGV[at], tonumber(ARGV[at + 1])
  if kind == 'rate' then
    store_level(KEYS[i], limit, seen[i] - tonumber(ARGV[at + 2]))
  elseif kind == 'quota' then
    redis.call('INCRBY', KEYS[i], ARGV[at + 2])
    redis.call('EXPIREAT', KEYS[i], ARGV[at + 3])
  elseif tonumber(ARGV[at + 2]) > 0 then
    redis.call('ZADD', KEYS[i], now + lease, member)
    redis.call('EXPIRE', KEYS[i], lease * 2)
  end
  reply[i + 1] = tostring(seen[i])
end
return reply
