-- Prepaid credits (account.lua comes first). KEYS: the account, its days
-- (day start -> credits used), its grants (a list of JSON) and its
-- idempotency keys (key -> "at amount"), all under the customer's tag.
-- ARGV[1] the operation, then the period (p, i, w) and the plan's grant and
-- rollover (0/1) as of the operation; then:
-- 'charge': instance, n, then n times (seq, credits, day): charges from
--   that instance's spool, in sequence order; one at or below the last
--   applied is skipped (a delivery retried after a crash).
-- 'grant': at, amount, idempotency key ('' for none), the grant's JSON,
--   how long keys are remembered (ms).
-- 'read': nothing more.
-- Reply: status (charge: charges applied; grant: 0 applied, 1 duplicate,
-- 2 conflict), then remaining, granted and used before and after.
local op = ARGV[1]
local p, i, w, grant, rollover = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'
local key, days, grants, keys = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function view(A) return { A.l + A.o, A.b + A.g + A.x, A.u } end

if op == 'read' then
  local A = account(key, p, i, w, grant, rollover)
  local fields = { A.p, A.l, A.o, A.b, A.g, A.u }
  if A.rolled then return { fields, {}, {} } end
  return { fields, redis.call('HGETALL', days), redis.call('LRANGE', grants, '0', '-1') }
end

local A = account(key, p, i, w, grant, rollover)
if A.rolled then redis.call('DEL', days, grants) end
local before = view(A)
local status = 0
if op == 'charge' then
  local inst, n = ARGV[7], tonumber(ARGV[8])
  local hwm = tonumber(redis.call('HGET', key, 'q:' .. inst) or '-1')
  local last = hwm
  for j = 0, n - 1 do
    local seq, c, day = tonumber(ARGV[9 + 3 * j]), tonumber(ARGV[10 + 3 * j]), ARGV[11 + 3 * j]
    if seq > hwm then
      local from = math.min(c, math.max(A.l, 0))
      A.l = A.l - from
      A.o = A.o - (c - from)
      A.u = A.u + c
      redis.call('HINCRBY', days, day, string.format('%d', c))
      status = status + 1
      last = math.max(last, seq)
    end
  end
  if last > hwm then redis.call('HSET', key, 'q:' .. inst, string.format('%d', last)) end
elseif op == 'grant' then
  local at, amount, idem, json, ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10], ARGV[11]
  if idem ~= '' then
    local seen = redis.call('HGET', keys, idem)
    if seen then
      local t, amt = string.match(seen, '^(%d+) (-?%d+)$')
      if t and tonumber(t) + tonumber(ttl) > at then
        if tonumber(amt) == amount then status = 1 else status = 2 end
      end
    end
  end
  if status == 0 then
    if idem ~= '' then
      redis.call('HSET', keys, idem, ARGV[7] .. ' ' .. ARGV[8])
      -- Kept while grants keep coming, each at least its time to live.
      redis.call('PEXPIRE', keys, ttl)
    end
    A.o = A.o + amount
    A.x = A.x + amount
    redis.call('RPUSH', grants, json)
  end
end
account_save(key, A)
local after = view(A)
return { status, before[1], before[2], before[3], after[1], after[2], after[3] }
