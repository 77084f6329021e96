-- The shared limiter: every decision on sending limits, atomic for all sender processes.
--
-- One script, loaded once and run with EVALSHA; ARGV[1] names the operation.
-- Every time is clock epoch seconds given by the caller (never Redis TIME);
-- every TTL is relative seconds (a compressed clock runs faster than the
-- wall clock, so a key outlives its need and never dies before it).
-- All keys share the `{prefix}` hash tag, so they live in one cluster slot.
--
-- reserve / capacity
--   KEYS: 1 epoch, 2 account rate ZSET, 3 account factor, 4 campaign rate ZSET,
--         5 domain rate ZSET, 6 domain factor, 7 daily counter, 8 warm-up counter,
--         9 warm-up cap, 10 quota, 11 token record, 12 the account's demand registry (HASH)
--   ARGV: 1 mode, 2 token, 3 now, 4 window, 5 account rate, 6 campaign rate,
--         7 domain rate (0: none), 8 daily limit, 9 default warm-up cap, 10 quota enforced (0/1),
--         11 next local midnight, 12 retry seconds, 13 key TTL (s), 14 expected epoch (record only),
--         15 the campaign's priority ('' : no share rule), 16 campaign id,
--         17 the campaign windows' key prefix (`{prefix}:crate:`; + campaign id = its window ZSET)
--   reserve  -> {granted 0/1, reason, retry_at, factor, quota seen, warm-up cap, domain factor, epoch}
--   capacity -> {available, reason, retry_at} (read-only; domain throttles not counted)
--   Admission by priority and fair share (ARGV[15] set, account rate > 0): the registry holds,
--   per campaign competing for the account, "priority|demand|until" (demand: sends it still
--   wants; until: clock time the entry holds without being refreshed). A campaign gets nothing
--   while a live entry of higher priority has demand; within its priority the window (what the
--   tier used in it plus what is left) is shared max-min fairly: each campaign up to its use
--   plus demand, equal parts otherwise, so a share nobody uses flows to the others. A refusal
--   by share is `rate_per_hour`, due after retry seconds. Every granted send counts in its
--   campaign's window ZSET and takes one from its registry demand.
--   record   -> takes like a granted reserve without checking (replays grants made during an
--               outage) when the epoch still equals ARGV[14]; 1 when it took, 0 otherwise
-- refund   KEYS: 1 token record            -> 1 when something was given back, 0 for an unknown token
-- unplace  KEYS: 1 token record            -> like refund, only for a restored placeholder (r=1)
-- feedback KEYS: 1 account factor [, 2 domain factor]; ARGV: mode, slow (0/1), slow factor,
--          min factor, recover step          -> new account factor
-- restore  KEYS: 1 epoch, 2 lock, then 6 per entry: token record, account ZSET, campaign ZSET,
--          domain ZSET, daily counter, warm-up counter (the placeholder key for a limit that
--          does not apply)
--          ARGV: mode, lock token, now, window, key TTL, lock ms, placeholder key, then 3 per entry:
--          token, at, day TTL (0: the day is over)
--          -> entries restored, -1 epoch exists already, -2 the lock is not ours
--          A restored token record carries r=1: a placeholder. A reserve of that token (its send
--          was claimed but not yet granted when Redis lost its state) gives it back and decides
--          afresh; any other token record makes a reserve grant again without taking.
-- finish   KEYS: 1 epoch, 2 lock; ARGV: mode, lock token, epoch value
--          -> 1 epoch set, 0 epoch existed already, -2 the lock is not ours
-- unlock   KEYS: 1 lock; ARGV: mode, lock token -> 1 when the lock was ours and is gone

local mode = ARGV[1]
local BIG = 1000000
local EPS = 1e-9

local function fmt(x)
  return string.format('%.17g', x)
end

local function factor_of(key)
  local f = tonumber(redis.call('GET', key))
  if f == nil or f > 1 or f <= 0 then
    return 1
  end
  return f
end

local function scaled(rate, factor)
  return math.max(1, math.floor(rate * factor + EPS))
end

-- Entries of a sliding window ZSET inside (now - window, +inf): their count, and when the
-- count falls below `limit` again (nil while under it). `prune` drops the older entries.
local function window_state(key, limit, now, window, prune)
  local low = fmt(now - window)
  local count
  if prune then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', low)
    count = redis.call('ZCARD', key)
  else
    count = redis.call('ZCOUNT', key, '(' .. low, '+inf')
  end
  if count < limit then
    return count, nil
  end
  local entry = redis.call('ZRANGEBYSCORE', key, '(' .. low, '+inf', 'WITHSCORES', 'LIMIT', count - limit, 1)
  return count, tonumber(entry[2]) + window
end

local function counter(key)
  return tonumber(redis.call('GET', key)) or 0
end

-- Gives back what the token record `tok` says `token` took; 1 when there was a record.
local function give_back(tok, token)
  local rec = redis.call('HGETALL', tok)
  if #rec == 0 then
    return 0
  end
  for i = 1, #rec, 2 do
    local field, key = rec[i], rec[i + 1]
    local kind = string.sub(field, 1, 1)
    if kind == 'z' then
      redis.call('ZREM', key, token)
    elseif kind == 'c' then
      if counter(key) > 0 then redis.call('DECR', key) end
    elseif field == 'q' then
      if redis.call('EXISTS', key) == 1 then redis.call('INCRBYFLOAT', key, 1) end
    end
  end
  redis.call('DEL', tok)
  return 1
end

local function parse_entry(value)
  local p, d, u = string.match(value or '', '^(%-?%d+)|(%-?%d+)|(.+)$')
  if p == nil then return nil end
  return tonumber(p), tonumber(d), tonumber(u)
end

-- How many more sends the campaign's priority and fair share allow in this window (nil: no
-- share rule applies). See the header.
local function share_left(l)
  if l.prio == nil or l.arate <= 0 then return nil end
  local reg = redis.call('HGETALL', KEYS[12])
  local low = '(' .. fmt(l.now - l.window)
  local tier = {}
  local own_demand = BIG
  for i = 1, #reg, 2 do
    local cid = reg[i]
    local p, d, u = parse_entry(reg[i + 1])
    if p ~= nil and d > 0 and u > l.now then
      if cid == l.campaign then
        own_demand = d
      elseif p > l.prio then
        return 0
      elseif p == l.prio then
        tier[#tier + 1] = {cid, d}
      end
    end
  end
  if #tier == 0 then return nil end
  local mine = redis.call('ZCOUNT', KEYS[4], low, '+inf')
  local limit = scaled(l.arate, l.factor)
  local pool = limit - redis.call('ZCOUNT', KEYS[2], low, '+inf') + mine
  local wants = {mine + own_demand}
  for _, peer in ipairs(tier) do
    local used = redis.call('ZCOUNT', l.crate_prefix .. peer[1], low, '+inf')
    pool = pool + used
    wants[#wants + 1] = used + peer[2]
  end
  -- max-min fair split of the pool (water-filling): who wants less than an equal part gets
  -- what it wants, the others share the rest equally
  local own_want = wants[1]
  table.sort(wants)
  local members, rest, level = #wants, pool, nil
  for _, want in ipairs(wants) do
    if want * members <= rest then
      rest = rest - want
      members = members - 1
    else
      level = rest / members
      break
    end
  end
  if level == nil then return own_want - mine end
  return math.min(own_want, math.ceil(level - EPS)) - mine
end

-- One send of the campaign granted: one less in its registry demand.
local function spend(l)
  if l.prio == nil then return end
  local p, d, u = parse_entry(redis.call('HGET', KEYS[12], l.campaign))
  if p == nil then return end
  if d <= 1 then
    redis.call('HDEL', KEYS[12], l.campaign)
  else
    redis.call('HSET', KEYS[12], l.campaign, p .. '|' .. (d - 1) .. '|' .. fmt(u))
  end
end

-- Takes one send for ARGV[2] on every applicable limit and writes the token record.
local function take(l)
  local rec = {}
  local token = ARGV[2]
  local function add(key, field)
    redis.call('ZADD', key, fmt(l.now), token)
    redis.call('EXPIRE', key, l.ttl)
    rec[#rec + 1] = field
    rec[#rec + 1] = key
  end
  local function incr(key, field)
    redis.call('INCR', key)
    redis.call('EXPIRE', key, l.day_ttl)
    rec[#rec + 1] = field
    rec[#rec + 1] = key
  end
  if l.quota ~= nil then
    l.quota = tonumber(redis.call('INCRBYFLOAT', KEYS[10], -1))
    rec[#rec + 1] = 'q'
    rec[#rec + 1] = KEYS[10]
  end
  if l.arate > 0 then add(KEYS[2], 'za') end
  if l.crate > 0 or l.prio ~= nil then add(KEYS[4], 'zc') end
  if l.drate > 0 then add(KEYS[5], 'zd') end
  if l.daily > 0 then incr(KEYS[7], 'cd') end
  if l.warm > 0 then incr(KEYS[8], 'cw') end
  rec[#rec + 1] = 'at'
  rec[#rec + 1] = fmt(l.now)
  redis.call('HSET', KEYS[11], unpack(rec))
  redis.call('EXPIRE', KEYS[11], l.ttl)
  spend(l)
end

local function limits()
  local l = {
    now = tonumber(ARGV[3]), window = tonumber(ARGV[4]), arate = tonumber(ARGV[5]),
    crate = tonumber(ARGV[6]), drate = tonumber(ARGV[7]), daily = tonumber(ARGV[8]),
    warm = tonumber(ARGV[9]), quota_enforced = ARGV[10] == '1', next_day = tonumber(ARGV[11]),
    retry = tonumber(ARGV[12]), ttl = tonumber(ARGV[13]),
    prio = tonumber(ARGV[15] or ''), campaign = ARGV[16] or '', crate_prefix = ARGV[17] or '',
  }
  if KEYS[12] == nil then l.prio = nil end
  l.day_ttl = math.max(1, math.ceil(l.next_day - l.now + 86400))
  l.factor = factor_of(KEYS[3])
  l.dfactor = 1
  if l.drate > 0 then l.dfactor = factor_of(KEYS[6]) end
  l.cap = 0
  if l.warm > 0 then l.cap = tonumber(redis.call('GET', KEYS[9])) or l.warm end
  if l.quota_enforced then l.quota = tonumber(redis.call('GET', KEYS[10])) end
  return l
end

-- Every limit's room: calls `each(remaining, reason, retry_at)`; retry_at is nil while room is left.
-- `prune` (reserve) drops entries that left the windows; capacity, which prunes nothing, skips the
-- domain throttle.
local function check(l, prune, each)
  if l.arate > 0 then
    local limit = scaled(l.arate, l.factor)
    local count, at = window_state(KEYS[2], limit, l.now, l.window, prune)
    each(limit - count, 'rate_per_hour', at)
  end
  if l.crate > 0 then
    local count, at = window_state(KEYS[4], l.crate, l.now, l.window, prune)
    each(l.crate - count, 'campaign_rate', at)
  elseif prune and l.prio ~= nil then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', fmt(l.now - l.window))
  end
  local share = share_left(l)
  if share ~= nil then
    each(share, 'rate_per_hour', share <= 0 and (l.now + l.retry) or nil)
  end
  if l.drate > 0 and prune then
    local limit = scaled(l.drate, l.dfactor)
    local count, at = window_state(KEYS[5], limit, l.now, l.window, prune)
    each(limit - count, 'domain_throttle', at)
  end
  if l.daily > 0 then
    local left = l.daily - counter(KEYS[7])
    each(left, 'daily_limit', left <= 0 and l.next_day or nil)
  end
  if l.warm > 0 then
    local left = l.cap - counter(KEYS[8])
    each(left, 'warmup_cap', left <= 0 and l.next_day or nil)
  end
  if l.quota_enforced then
    if l.quota == nil then
      each(0, 'quota_unknown', l.now + l.retry)
    else
      local left = math.floor(l.quota)
      each(left, 'quota_exhausted', left <= 0 and (l.now + l.retry) or nil)
    end
  end
end

if mode == 'reserve' or mode == 'capacity' then
  local l = limits()
  local epoch = redis.call('GET', KEYS[1])
  if not epoch then
    if mode == 'capacity' then
      return {0, 'limiter_unavailable', fmt(l.now + l.retry)}
    end
    return {0, 'limiter_unavailable', fmt(l.now + l.retry), fmt(l.factor), '', '', '1', ''}
  end
  if mode == 'reserve' and redis.call('EXISTS', KEYS[11]) == 1 then
    if redis.call('HGET', KEYS[11], 'r') == '1' then
      -- a placeholder the rebuild wrote for a claim not yet granted: decide afresh
      give_back(KEYS[11], ARGV[2])
    else
      -- this token was granted already (a retried call): grant again, take nothing more
      return {1, '', '', fmt(l.factor), l.quota and fmt(l.quota) or '', fmt(l.cap), fmt(l.dfactor), epoch}
    end
  end
  local reason, retry_at = nil, nil
  local available = BIG
  check(l, mode == 'reserve', function(left, why, at)
    if left < available then available = math.max(0, left) end
    if at ~= nil and (retry_at == nil or at > retry_at) then
      reason, retry_at = why, at
    end
  end)
  if mode == 'capacity' then
    if available > 0 then return {available, '', ''} end
    return {0, reason, fmt(retry_at)}
  end
  local granted = 0
  if reason == nil then
    granted = 1
    take(l)
    reason, retry_at = '', nil
  end
  local quota = ''
  if l.quota ~= nil then quota = fmt(l.quota) end
  return {granted, reason, retry_at and fmt(retry_at) or '', fmt(l.factor), quota, fmt(l.cap), fmt(l.dfactor), epoch}
end

if mode == 'record' then
  if redis.call('GET', KEYS[1]) ~= ARGV[14] or redis.call('EXISTS', KEYS[11]) == 1 then
    return 0
  end
  take(limits())
  return 1
end

if mode == 'refund' then
  return give_back(KEYS[1], ARGV[2])
end

if mode == 'unplace' then
  if redis.call('HGET', KEYS[1], 'r') ~= '1' then return 0 end
  return give_back(KEYS[1], ARGV[2])
end

if mode == 'feedback' then
  local slow = ARGV[2] == '1'
  local slow_factor, min_factor, step = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local function adjust(key)
    local f = factor_of(key)
    if slow then
      f = math.max(min_factor, f * slow_factor)
    else
      f = math.min(1, f + step)
    end
    if f >= 1 - EPS then
      redis.call('DEL', key)
      return 1
    end
    local text = string.format('%.6f', f)
    redis.call('SET', key, text)
    return tonumber(text)
  end
  local factor = adjust(KEYS[1])
  if KEYS[2] ~= nil then adjust(KEYS[2]) end
  return fmt(factor)
end

if mode == 'restore' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -2 end
  local now, window, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  local restored = 0
  local n = (#KEYS - 2) / 6
  for i = 0, n - 1 do
    local k, a = 2 + i * 6, 7 + i * 3
    local tok, token, at, day_ttl = KEYS[k + 1], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    if redis.call('EXISTS', tok) == 0 then
      local rec = {}
      local in_window = at > now - window
      for j = 2, 6 do
        local key = KEYS[k + j]
        if key ~= ARGV[7] then
          if j <= 4 and in_window then
            redis.call('ZADD', key, fmt(at), token)
            redis.call('EXPIRE', key, ttl)
            rec[#rec + 1] = 'z' .. j
            rec[#rec + 1] = key
          elseif j > 4 and day_ttl > 0 then
            redis.call('INCR', key)
            redis.call('EXPIRE', key, day_ttl)
            rec[#rec + 1] = 'c' .. j
            rec[#rec + 1] = key
          end
        end
      end
      if #rec > 0 then
        rec[#rec + 1] = 'at'
        rec[#rec + 1] = fmt(at)
        rec[#rec + 1] = 'r'
        rec[#rec + 1] = '1'
        redis.call('HSET', tok, unpack(rec))
        redis.call('EXPIRE', tok, math.max(ttl, day_ttl))
        restored = restored + 1
      end
    end
  end
  return restored
end

if mode == 'finish' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
    return 0
  end
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -2 end
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end

if mode == 'unlock' then
  if redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end

return redis.error_reply('rate_limit.lua: unknown mode ' .. tostring(mode))
