-- Renew the leases of the concurrency slots this replica's running calls hold.
-- KEYS: concurrency sets. ARGV: lease seconds, then the member to renew in each set.
local until_ = now + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', until_, ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1]) * 2)
end
return 1
