-- What each window holds now, for headers and reports.
-- KEYS: windows. ARGV: per window its kind and limit. Returns the level of each now.
local reply = {}
for i = 1, #KEYS do
  local kind, limit = ARGV[i * 2 - 1], tonumber(ARGV[i * 2])
  if kind == 'rate' then
    reply[i] = tostring(bucket_level(KEYS[i], limit))
  elseif kind == 'quota' then
    reply[i] = redis.call('GET', KEYS[i]) or '0'
  else
    reply[i] = tostring(redis.call('ZCOUNT', KEYS[i], now, '+inf'))
  end
end
return reply
