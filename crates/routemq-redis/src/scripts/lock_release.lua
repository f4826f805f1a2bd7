-- Compare-and-delete: delete KEYS[1] only while it still holds ARGV[1] (our token), so a
-- holder whose lease expired cannot delete the lock somebody else took since.
-- Returns 1 when deleted, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
