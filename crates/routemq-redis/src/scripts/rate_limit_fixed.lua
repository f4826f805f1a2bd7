-- Fixed-window rate limit, RouteMQ's scheme: INCR on every request (denied ones too) of
-- `<key>:<unix_s // window_s>`, the window key computed by the caller so that Redis Cluster
-- knows it. ARGV[1] the key's expiry in milliseconds (window + 1 s).
-- Returns the count after this request.
local count = redis.call('INCR', KEYS[1])
-- Also heal a counter left without expiry (e.g. written by a client that crashed between
-- INCR and EXPIRE), which would otherwise limit that window key forever.
if count == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return count
