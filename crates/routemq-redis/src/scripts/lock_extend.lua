-- Compare-and-pexpire: renew the lease of KEYS[1] to ARGV[2] ms only while it still holds
-- ARGV[1] (our token). Returns 1 when extended, 0 when the lock is no longer ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
