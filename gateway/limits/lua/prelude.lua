-- Shared by the scripts (prefixed to each): Redis's clock, and a bucket's level refilled up
-- to it (a bucket with no key is full: keys expire once their bucket would have refilled).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function bucket_level(key, limit)
  local state = redis.call('HMGET', key, 'level', 'at')
  if not state[1] then return limit end
  return math.min(limit, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * limit / 60)
end
local function store_level(key, limit, level)
  redis.call('HSET', key, 'level', level, 'at', now)
  redis.call('EXPIRE', key, math.ceil((limit - level) * 60 / limit) + 1)
end
