-- Sliding-window rate limit, exact: one sorted-set member per admitted request.
-- KEYS[1] the limit's key; ARGV[1] max; ARGV[2] window in microseconds;
-- ARGV[3] a nonce from the caller, so two requests in one microsecond stay two members.
-- Returns { allowed (1/0), remaining, retry_after_ms }.
-- Time comes from Redis (TIME), so every bridge instance sharing this Redis uses one clock.
local key = KEYS[1]
local max = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < max then
  redis.call('ZADD', key, now, string.format('%d', now) .. '-' .. ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window / 1000))
  return { 1, max - count - 1, 0 }
end
-- Denied requests are not recorded: the window counts admitted requests only. The next
-- slot frees when the entry that keeps the count at max leaves the window.
local entry = redis.call('ZRANGE', key, count - max, count - max, 'WITHSCORES')
local retry = 0
if entry[2] then
  retry = math.ceil((tonumber(entry[2]) + window - now) / 1000)
  if retry < 1 then retry = 1 end
end
return { 0, 0, retry }
