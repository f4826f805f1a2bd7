-- Token bucket as GCRA: one key holds the theoretical arrival time (TAT, microseconds).
-- KEYS[1] the limit's key; ARGV[1] emission interval T in microseconds (window / max);
-- ARGV[2] burst (requests admitted back to back from an idle key).
-- Returns { allowed (1/0), remaining, retry_after_ms }.
local key = KEYS[1]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', key))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return { 0, 0, math.ceil((allow_at - now) / 1000) }
end
-- The key lives exactly as long as it remembers something: an expired key is an idle bucket.
redis.call('SET', key, string.format('%d', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return { 1, math.floor((now - allow_at) / interval), 0 }
