-- A customer's prepaid credits, mirroring core's credits::Account (the
-- test in credits.rs runs one history through both). Hash fields:
-- p the period's start (ms), i its number (days or months since 1970), w
-- its kind ('d' or 'm'), l what is left of the plan's grant, o everything
-- else (grants, purchases, rollover; may be negative), b the balance the
-- period opened with, g the plan's grant, u credits used this period, x
-- credits granted this period; q:<instance> the last charge applied from
-- that instance's spool.
-- Numbers are Lua doubles: exact up to 2^53 credits.

-- The account in `key` moved into the period (p, i, w) of a plan granting
-- `grant` (with `rollover`); `rolled` says the period changed (its days and
-- grants are then gone). A customer seen for the first time starts with
-- the plan's grant.
local function account(key, p, i, w, grant, rollover)
  local v = redis.call('HMGET', key, 'p', 'i', 'l', 'o', 'b', 'g', 'u', 'x', 'w')
  if v[1] == false then
    return { p = p, i = i, w = w, l = grant, o = 0, b = 0, g = grant, u = 0, x = 0, rolled = true }
  end
  local A = { p = tonumber(v[1]), i = tonumber(v[2]), l = tonumber(v[3]), o = tonumber(v[4]),
              b = tonumber(v[5]), g = tonumber(v[6]), u = tonumber(v[7]), x = tonumber(v[8]),
              w = v[9], rolled = false }
  if A.p >= p then
    -- The plan (or its grant) changed within the period: the new grant
    -- applies now, less what of the old one was spent.
    if A.p == p and A.g ~= grant then
      A.l = math.max(0, grant - (A.g - A.l))
      A.g = grant
    end
    return A
  end
  if rollover then
    -- Every period begun keeps what was left of the one before (periods
    -- of another kind, after a plan change, count as one).
    local skipped = 0
    if A.w == w then skipped = math.max(0, i - A.i - 1) end
    A.o = A.o + math.max(A.l, 0) + grant * skipped
  end
  A.p, A.i, A.w, A.b, A.l, A.g, A.u, A.x, A.rolled = p, i, w, A.o, grant, grant, 0, 0, true
  return A
end

local function account_save(key, A)
  local function int(x) return string.format('%d', x) end
  redis.call('HSET', key, 'p', int(A.p), 'i', int(A.i), 'w', A.w, 'l', int(A.l), 'o', int(A.o),
             'b', int(A.b), 'g', int(A.g), 'u', int(A.u), 'x', int(A.x))
end
