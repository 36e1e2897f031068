-- ARGV: instance, now (ms), call sequence, number of groups; then per group
-- (one customer and plan): number of limits, per limit its kind ('s'
-- sliding, 'c' calendar, 'p' a cap on requests in flight), window ms
-- (sliding), window end (calendar) or lease expiry (cap), quota and overage
-- (0/1); then 1 and the period arguments of credits.lua if the group's
-- credits are checked here, else 0; then number of requests and each
-- request's cost (with credits: and what this instance holds of them
-- besides, what the request holds, and 1 if it costs credits).
-- KEYS: per group and limit, a sliding window's set and total, a calendar
-- window's counter, or a cap's set of leases (member
-- `<instance>:<call>:<group>:<request>`, score its expiry; the instance
-- renews the leases of requests still running and removes each at its end,
-- so an instance that dies gives its leases back when they expire).
-- A group's credits: the customer's account (see account.lua), read as of
-- now, never written: usage is charged as it is recorded (credits.lua).
-- Reply: per group, per limit what the group starts from (units used, the
-- oldest charge still in a sliding window or -1), with credits the
-- balance (remaining, granted, used), then per request 0 if admitted, -1
-- if out of credits (no limit charged), else 1 + the seconds until its
-- sliding limits have room.
local inst, nows, seq = ARGV[1], ARGV[2], ARGV[3]
local now = tonumber(nows)
local out = {}
-- Each key is read once and written back once, at the end.
local slid, cal, par, order_s, order_c, order_p = {}, {}, {}, {}, {}, {}

-- Numbers go to Redis as integer strings: Lua's own number formatting
-- (and a reply's scores) cost more than the rest of a call.
local function int(x)
  return string.format('%d', x)
end

-- A stored charge's time and cost, from its member
-- `<ms>:<instance>:<call>:<cost>`. A member of an older version (no time)
-- counts as having left the window.
local function charge(member)
  local t, c = string.match(member, '^(%d+):.*:(%d+)$')
  if t == nil then return 0, tonumber(string.match(member, ':(%d+)$')) or 0 end
  return tonumber(t), tonumber(c)
end

-- A sliding window as of `now`: charges at or before now - w have left it
-- (counted out here and removed at the end).
local function sliding(key, tkey, ws)
  local s = slid[key]
  if s ~= nil then return s end
  local w = tonumber(ws)
  s = { key = key, tkey = tkey, w = w, ws = ws, off = 0, added = 0, changed = false,
        used = tonumber(redis.call('GET', tkey) or '0') }
  slid[key] = s
  table.insert(order_s, s)
  local edge, n = now - w, 2
  while true do
    local head = redis.call('ZRANGE', key, int(s.off), int(s.off + n - 1))
    for j = 1, #head do
      local t, c = charge(head[j])
      if t > edge then
        s.first = t
        break
      end
      s.used = s.used - c
      s.off = s.off + 1
      s.changed = true
    end
    if s.first ~= nil or #head < n then break end
    n = 32
  end
  -- No stored charge is left in the window: nothing is in use, whatever
  -- the total key says (it may have outlived the set).
  if s.first == nil then
    if s.used ~= 0 then s.changed = true end
    s.used = 0
  end
  if s.used < 0 then s.used = 0 end
  return s
end

local function calendar(key, wend)
  local c = cal[key]
  if c ~= nil then return c end
  local v = redis.call('GET', key)
  c = { key = key, used = tonumber(v or '0'), fresh = (v == false), added = 0,
        ttl = tonumber(wend) - now + 60000 }
  cal[key] = c
  table.insert(order_c, c)
  return c
end

-- A cap's leases as of `now`: expired ones (an instance that died) go.
local function parallel(key)
  local p = par[key]
  if p ~= nil then return p end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', nows)
  p = { key = key, used = redis.call('ZCARD', key), leases = {}, last = 0 }
  par[key] = p
  table.insert(order_p, p)
  return p
end

-- Seconds until `cost` fits under `quota`: walks the charges in the window
-- oldest first (this call's own charge is at `now`). Read once per key.
local function wait_for(s, quota, cost)
  if cost > quota then return math.ceil(s.w / 1000) end
  if s.log == nil then s.log = redis.call('ZRANGE', s.key, int(s.off), '-1') end
  local log, in_use, pending, j = s.log, s.used, s.added, 1
  while true do
    local t, c
    local lt, lc
    if j <= #log then lt, lc = charge(log[j]) end
    if pending > 0 and (lt == nil or lt > now) then
      t, c, pending = now, pending, 0
    elseif lt ~= nil then
      t, c = lt, lc
      j = j + 1
    else
      break
    end
    in_use = in_use - c
    if in_use + cost <= quota then return math.max(1, math.ceil((t + s.w - now) / 1000)) end
  end
  return math.ceil(s.w / 1000)
end

local k, a = 0, 5
for g = 1, tonumber(ARGV[4]) do
  local n = tonumber(ARGV[a])
  a = a + 1
  local lim = {}
  for i = 1, n do
    local kind, x, quota = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
    local L = { quota = quota, over = ARGV[a + 3] == '1', sliding = kind == 's', cap = kind == 'p' }
    a = a + 4
    local first = -1
    if L.cap then
      L.s = parallel(KEYS[k + 1])
      L.expiry = x
      k = k + 1
    elseif L.sliding then
      L.s = sliding(KEYS[k + 1], KEYS[k + 2], x)
      k = k + 2
      first = L.s.first or -1
      if L.s.added > 0 and (first < 0 or now < first) then first = now end
    else
      L.s = calendar(KEYS[k + 1], x)
      k = k + 1
    end
    lim[i] = L
    table.insert(out, L.s.used)
    table.insert(out, first)
  end
  local C = nil
  if ARGV[a] == '1' then
    C = account(KEYS[k + 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3],
                tonumber(ARGV[a + 4]), ARGV[a + 5] == '1')
    k = k + 1
    a = a + 6
    table.insert(out, C.l + C.o)
    table.insert(out, C.b + C.g + C.x)
    table.insert(out, C.u)
  else
    a = a + 1
  end
  -- The group's requests, in order, each seeing the charges before it.
  local m = tonumber(ARGV[a])
  a = a + 1
  for r = 1, m do
    local cost = tonumber(ARGV[a])
    a = a + 1
    local ok, broke = true, false
    if C ~= nil then
      -- What is not held must be above zero and cover this request's hold.
      local held, want = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
      local free = C.l + C.o - held
      broke = ARGV[a + 2] == '1' and (free <= 0 or free < want)
      a = a + 3
    end
    if broke then ok = false end
    for i = 1, n do
      if not ok then break end
      local L = lim[i]
      -- A cap takes one per request, whatever it costs.
      local need = cost
      if L.cap and cost > 0 then need = 1 end
      if not L.over and L.s.used + need > L.quota then ok = false break end
    end
    if broke then
      table.insert(out, -1)
    elseif ok then
      for i = 1, n do
        local L = lim[i]
        local s = L.s
        if L.cap then
          if cost > 0 then
            s.used = s.used + 1
            table.insert(s.leases, L.expiry)
            table.insert(s.leases, inst .. ':' .. seq .. ':' .. g .. ':' .. r)
            s.last = math.max(s.last, tonumber(L.expiry))
          end
        else
          s.used = s.used + cost
          s.added = s.added + cost
        end
      end
      table.insert(out, 0)
    else
      local wait = 0
      for i = 1, n do
        local L = lim[i]
        if L.sliding and not L.over and L.s.used + cost > L.quota then
          wait = math.max(wait, wait_for(L.s, L.quota, cost))
        end
      end
      table.insert(out, 1 + wait)
    end
  end
end

-- Write back, once per key: a sliding window gets one charge per call.
for _, s in ipairs(order_s) do
  if s.off > 0 then redis.call('ZREMRANGEBYRANK', s.key, '0', int(s.off - 1)) end
  if s.added > 0 then
    redis.call('ZADD', s.key, nows, nows .. ':' .. inst .. ':' .. seq .. ':' .. int(s.added))
  end
  if s.changed or s.added > 0 then
    -- The set and its total expire together.
    redis.call('PEXPIRE', s.key, s.ws)
    redis.call('SET', s.tkey, int(s.used), 'PX', s.ws)
  end
end
for _, p in ipairs(order_p) do
  if #p.leases > 0 then
    redis.call('ZADD', p.key, unpack(p.leases))
    redis.call('PEXPIRE', p.key, int(p.last - now + 60000))
  end
end
for _, c in ipairs(order_c) do
  if c.added > 0 then
    redis.call('INCRBY', c.key, int(c.added))
    if c.fresh then redis.call('PEXPIRE', c.key, int(c.ttl)) end
  end
end
return out
