//! The Redis limiter: a Lua script checks and charges every limit of the
//! customer's plan atomically, with the memory limiter's semantics (the
//! shared conformance suite runs against both). Requests that arrive in the
//! same wake-up share one script call (see [`RedisLimiter`]).
//!
//! Keys, all under the customer's hash tag so one script touches one slot:
//! - sliding window: `{P:cus}:s:<policy>:<window ms>` is a sorted set of
//!   admitted charges (member `<instance>:<seq>:<cost>`, score = time in ms)
//!   and `…:t` the sum of their costs;
//! - calendar window: `{P:cus}:c:<policy>:<window start ms>` a counter that
//!   expires a minute after the window ends.
//!
//! Time comes from the instance (`now` argument), so all instances must run
//! NTP; a skew of d ms shifts window edges by d ms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis::Script;

use crate::clock::{day_start, month_bounds, Clock, DAY};
use crate::limiter::{Decision, Limiter, LimiterError, PolicyStatus};
use crate::lock;
use crate::plans::{Plan, Window};
use crate::redis_conn::RedisConn;

const SCRIPT: &str = r#"
local inst = ARGV[2]
local out = {}
-- What the batch has read of each key, and what it will write back at the
-- end: reads happen once per key (more only if time moves on within the
-- batch), writes once per key.
local slid, cal, order_s, order_c = {}, {}, {}, {}

local function cost_of(member)
  return tonumber(string.match(member, ':(%d+)$'))
end

-- A sliding window's state as seen at `now`: charges at or before now - w
-- have left it (they are counted out here and removed at the end).
local function sliding(key, tkey, w, now)
  local s = slid[key]
  if s == nil then
    s = { key = key, tkey = tkey, w = w, off = 0, adds = {}, added = 0, changed = false,
          used = tonumber(redis.call('GET', tkey) or '0') }
    slid[key] = s
    table.insert(order_s, s)
  end
  local edge = now - w
  if s.edge == nil or edge > s.edge then
    s.edge = edge
    s.first = nil
    s.sorted = nil
    while true do
      local head = redis.call('ZRANGE', key, s.off, s.off + 7, 'WITHSCORES')
      local j = 1
      while j <= #head and tonumber(head[j + 1]) <= edge do
        s.used = s.used - cost_of(head[j])
        s.off = s.off + 1
        s.changed = true
        j = j + 2
      end
      if j <= #head then
        s.first = tonumber(head[j + 1])
        break
      end
      if #head < 16 then break end
    end
    -- No stored charge is left in the window: the total is what this batch
    -- added, whatever the total key says (it may have outlived the set).
    if s.first == nil then
      if s.used ~= s.added then s.changed = true end
      s.used = s.added
    end
    if s.used < 0 then s.used = 0 end
  end
  return s
end

local function calendar(key, wend, now)
  local c = cal[key]
  if c == nil then
    local v = redis.call('GET', key)
    c = { key = key, used = tonumber(v or '0'), fresh = (v == false), add = 0,
          ttl = wend - now + 60000 }
    cal[key] = c
    table.insert(order_c, c)
  end
  return c
end

-- The requests, in order, each seeing the charges of those before it.
local k, a = 0, 2
for _ = 1, tonumber(ARGV[1]) do
  local now, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local member = inst .. ':' .. ARGV[a + 3] .. ':' .. ARGV[a + 2]
  local n = tonumber(ARGV[a + 4])
  local st, allowed = {}, true
  for i = 1, n do
    local b = a + 4 + (i - 1) * 5
    local quota, w = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local s
    if ARGV[b + 1] == 's' then
      s = sliding(KEYS[k + 2 * i - 1], KEYS[k + 2 * i], w, now)
    else
      s = calendar(KEYS[k + 2 * i - 1], tonumber(ARGV[b + 4]), now)
    end
    st[i] = s
    if s.used + cost > quota and ARGV[b + 5] == '0' then allowed = false end
  end
  table.insert(out, allowed and 1 or 0)
  for i = 1, n do
    local b = a + 4 + (i - 1) * 5
    local kind, quota, w, wend = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    local s = st[i]
    local over = s.used + cost > quota and ARGV[b + 5] == '1'
    local violated = s.used + cost > quota and ARGV[b + 5] == '0'
    if allowed and cost > 0 then
      s.used = s.used + cost
      if kind == 's' then
        table.insert(s.adds, now)
        table.insert(s.adds, member)
        s.added = s.added + cost
        if s.sorted ~= nil then
          if #s.sorted > 0 and s.sorted[#s.sorted][1] > now then
            s.sorted = nil
          else
            table.insert(s.sorted, { now, cost })
          end
        end
      else
        s.add = s.add + cost
      end
    end
    local remaining = quota - s.used
    if remaining < 0 then remaining = 0 end
    local reset, wait = 0, 0
    if kind == 's' then
      local first = s.first
      if #s.adds > 0 and (first == nil or s.adds[1] < first) then first = s.adds[1] end
      if first ~= nil then reset = math.ceil((first + w - now) / 1000) end
      if violated then
        wait = math.ceil(w / 1000)
        if cost <= quota then
          -- When enough charges will have left: walk them oldest first.
          -- Read and sorted once per key and edge, however many are refused.
          if s.sorted == nil then
            local all = redis.call('ZRANGE', s.key, s.off, -1, 'WITHSCORES')
            s.sorted = {}
            for j = 1, #all, 2 do table.insert(s.sorted, { tonumber(all[j + 1]), cost_of(all[j]) }) end
            for j = 1, #s.adds, 2 do table.insert(s.sorted, { s.adds[j], cost_of(s.adds[j + 1]) }) end
            table.sort(s.sorted, function(x, y) return x[1] < y[1] end)
          end
          local in_use = s.used
          for _, e in ipairs(s.sorted) do
            in_use = in_use - e[2]
            if in_use + cost <= quota then
              wait = math.max(1, math.ceil((e[1] + w - now) / 1000))
              break
            end
          end
        end
      end
    else
      if s.used > 0 then reset = math.ceil((wend - now) / 1000) end
      if violated then wait = math.max(1, math.ceil((wend - now) / 1000)) end
    end
    table.insert(out, remaining)
    table.insert(out, reset)
    table.insert(out, violated and 1 or 0)
    table.insert(out, wait)
    table.insert(out, over and 1 or 0)
  end
  k = k + 2 * n
  a = a + 4 + 5 * n
end

-- Write back, once per key.
for _, s in ipairs(order_s) do
  if s.off > 0 then redis.call('ZREMRANGEBYSCORE', s.key, '-inf', s.edge) end
  for j = 1, #s.adds, 512 do
    redis.call('ZADD', s.key, unpack(s.adds, j, math.min(j + 511, #s.adds)))
  end
  if s.changed or #s.adds > 0 then
    -- The set and its total expire together.
    redis.call('PEXPIRE', s.key, s.w)
    redis.call('SET', s.tkey, s.used, 'PX', s.w)
  end
end
for _, c in ipairs(order_c) do
  if c.add > 0 then
    redis.call('INCRBY', c.key, c.add)
    if c.fresh then redis.call('PEXPIRE', c.key, c.ttl) end
  end
end
return out
"#;

/// One request's part of a batch: its keys and arguments, rendered by the
/// request itself, and where its answer goes.
struct Queued {
    /// Two per limit (a request queues only if it has limits), each
    /// starting with the hash tag `{prefix:customer}`.
    keys: Vec<String>,
    now: u64,
    cost: u64,
    seq: u64,
    /// Per limit: kind, quota, window (ms), window end (calendar), overage.
    limits: Vec<(&'static str, u64, u64, u64, u8)>,
    done: tokio::sync::oneshot::Sender<Result<Vec<i64>, LimiterError>>,
}

impl Queued {
    /// The `{prefix:customer}` every key of the request starts with: the
    /// requests of one cluster call must share it (and so a slot).
    fn hash_tag(&self) -> &str {
        let k = self.keys.first().map_or("", String::as_str);
        k.find('}').map_or(k, |i| &k[..=i])
    }
}

#[derive(Default)]
struct Batch {
    items: Vec<Queued>,
    /// A flush is on its way for what is queued.
    scheduled: bool,
}

struct Shared {
    /// Made at start-up on Tollgate's Redis runtime; used until `here`
    /// exists and whenever it cannot be made.
    conn: RedisConn,
    /// The limiter's own connection, made by the first request on the
    /// runtime that serves requests, so a round trip costs no hop to
    /// another thread's driver task and back.
    here: tokio::sync::OnceCell<RedisConn>,
    script: Script,
    instance: String,
    queue: std::sync::Mutex<Batch>,
    /// When to try making `here` again after a failure.
    retry_here_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Requests that arrive in the same wake-up of the proxy's runtime are
/// decided by one script call (in cluster mode, one per customer, whose keys
/// share a slot): at most one round trip per request, fewer under load.
/// Within a batch the script takes the requests in order, each seeing the
/// charges of those before it, exactly as separate calls would.
pub struct RedisLimiter {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    seq: AtomicU64,
}

impl RedisLimiter {
    pub fn new(conn: RedisConn, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        let mut id = [0u8; 6];
        crate::keys::random_bytes(&mut id)?;
        Ok(Self {
            shared: Arc::new(Shared {
                conn,
                here: tokio::sync::OnceCell::new(),
                script: Script::new(SCRIPT),
                instance: hex::encode(id),
                queue: std::sync::Mutex::new(Batch::default()),
                retry_here_at: std::sync::Mutex::new(None),
            }),
            clock,
            seq: AtomicU64::new(0),
        })
    }

    pub fn conn(&self) -> &RedisConn {
        &self.shared.conn
    }

    async fn run(&self, customer: &str, plan: &Plan, cost: u64) -> Result<Decision, LimiterError> {
        if plan.limits.is_empty() {
            return Ok(Decision {
                allowed: true,
                policies: Vec::new(),
                retry_after_secs: 0,
                overage: false,
                overage_meter: None,
            });
        }
        let now = self.clock.now_ms();
        let prefix = &self.shared.conn.config.prefix;
        let mut keys = Vec::with_capacity(2 * plan.limits.len());
        let mut limits = Vec::with_capacity(plan.limits.len());
        for l in &plan.limits {
            match l.window {
                Window::Sliding(w) => {
                    let base = format!("{{{prefix}:{customer}}}:s:{}:{w}", l.name);
                    let total = format!("{base}:t");
                    keys.push(base);
                    keys.push(total);
                    limits.push(("s", l.quota, w, 0, u8::from(l.overage)));
                }
                cal => {
                    let (start, end) = match cal {
                        Window::Day => (day_start(now), day_start(now) + DAY),
                        _ => month_bounds(now),
                    };
                    let key = format!("{{{prefix}:{customer}}}:c:{}:{start}", l.name);
                    // The second key is unused for calendar windows; passing
                    // the same key keeps KEYS aligned.
                    keys.push(key.clone());
                    keys.push(key);
                    limits.push(("c", l.quota, end - start, end, u8::from(l.overage)));
                }
            }
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let item = Queued {
            keys,
            now,
            cost,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            limits,
            done,
        };
        let first = {
            let mut q = lock(&self.shared.queue);
            q.items.push(item);
            !std::mem::replace(&mut q.scheduled, true)
        };
        if first {
            let shared = self.shared.clone();
            // Yields once first, so the requests this runtime already has
            // ready join the batch. (Outside a Tokio runtime, which the
            // proxy never is, the request sends its batch itself.)
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        // Should the task be dropped unrun (the runtime
                        // shutting down), the queue must not stay "scheduled"
                        // with nobody to send it: the guard answers its
                        // requests with an error (on_error applies) instead.
                        let guard = Unscheduled(&shared);
                        tokio::task::yield_now().await;
                        std::mem::forget(guard);
                        shared.flush().await;
                    });
                }
                Err(_) => shared.flush().await,
            }
        }
        let out = rx
            .await
            .map_err(|_| LimiterError::Unavailable("redis batch dropped".into()))??;
        decision(plan, &out)
    }
}

/// Clears a batch whose flush will never run (see `RedisLimiter::run`).
struct Unscheduled<'a>(&'a Shared);

impl Drop for Unscheduled<'_> {
    fn drop(&mut self) {
        let mut q = lock(&self.0.queue);
        q.scheduled = false;
        q.items.clear();
    }
}

/// Requests per script call at most: a call blocks Redis while it runs.
const MAX_BATCH: usize = 128;

/// After a failed attempt to make `here`, how long to use `conn` before
/// trying again.
const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Shared {
    /// The connection for this runtime (see `here`). A failed attempt to
    /// make it is not a Redis failure (the start-up connection works on):
    /// it is retried after [`RECONNECT_AFTER`].
    async fn conn_here(&self) -> &RedisConn {
        if let Some(c) = self.here.get() {
            return c;
        }
        let due = lock(&self.retry_here_at).is_none_or(|at| at <= std::time::Instant::now());
        if !due {
            return &self.conn;
        }
        match self.here.get_or_try_init(|| self.conn.connect_here()).await {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "redis limiter: cannot open its own connection ({e}); using the shared one"
                );
                *lock(&self.retry_here_at) = Some(std::time::Instant::now() + RECONNECT_AFTER);
                &self.conn
            }
        }
    }

    /// Sends what has queued up: one script call, or in cluster mode one
    /// per customer (a call's keys must share a slot).
    async fn flush(&self) {
        let items = {
            let mut q = lock(&self.queue);
            q.scheduled = false;
            std::mem::take(&mut q.items)
        };
        let conn = self.conn_here().await;
        let mut groups: Vec<Vec<Queued>> = Vec::new();
        for item in items {
            let open = groups.iter_mut().find(|g| {
                g.len() < MAX_BATCH && (!conn.config.cluster || g[0].hash_tag() == item.hash_tag())
            });
            match open {
                Some(g) => g.push(item),
                None => groups.push(vec![item]),
            }
        }
        futures_util::future::join_all(groups.into_iter().map(|g| self.call(conn, g))).await;
    }

    async fn call(&self, conn: &RedisConn, items: Vec<Queued>) {
        if items.is_empty() {
            return;
        }
        let mut inv = self.script.prepare_invoke();
        inv.arg(items.len()).arg(&self.instance);
        for q in &items {
            for k in &q.keys {
                inv.key(k);
            }
            inv.arg(q.now).arg(q.cost).arg(q.seq).arg(q.limits.len());
            for &(kind, quota, w, end, overage) in &q.limits {
                inv.arg(kind).arg(quota).arg(w).arg(end).arg(overage);
            }
        }
        let expected: usize = items.iter().map(|q| 1 + 5 * q.limits.len()).sum();
        let out = match conn.script::<Vec<i64>>(&inv).await {
            Ok(out) if out.len() == expected => out,
            Ok(out) => {
                let e = format!("unexpected script reply of {} items", out.len());
                for q in items {
                    let _ = q.done.send(Err(LimiterError::Unavailable(e.clone())));
                }
                return;
            }
            Err(e) => {
                for q in items {
                    let _ = q.done.send(Err(LimiterError::Unavailable(e.to_string())));
                }
                return;
            }
        };
        let mut at = 0;
        for q in items {
            let len = 1 + 5 * q.limits.len();
            let _ = q.done.send(Ok(out[at..at + len].to_vec()));
            at += len;
        }
    }
}

/// Reads one request's part of the script's reply.
fn decision(plan: &Plan, out: &[i64]) -> Result<Decision, LimiterError> {
    if out.len() != 1 + 5 * plan.limits.len() {
        return Err(LimiterError::Unavailable(format!(
            "unexpected script reply of {} items",
            out.len()
        )));
    }
    let allowed = out[0] == 1;
    let mut retry_after_secs = 0;
    let (mut overage, mut overage_meter) = (false, None);
    let policies = plan
        .limits
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let r = &out[1 + 5 * i..6 + 5 * i];
            let violated = r[2] == 1;
            if r[4] == 1 {
                overage = true;
                if overage_meter.is_none() {
                    overage_meter = l.overage_meter.clone();
                }
            }
            if violated {
                retry_after_secs = retry_after_secs.max(r[3].max(0) as u64);
            }
            PolicyStatus {
                name: l.name.clone(),
                quota: l.quota,
                remaining: r[0].max(0) as u64,
                reset_secs: r[1].max(0) as u64,
                violated,
            }
        })
        .collect();
    let overage = allowed && overage;
    Ok(Decision {
        allowed,
        policies,
        retry_after_secs,
        overage,
        overage_meter: if overage { overage_meter } else { None },
    })
}

impl Limiter for RedisLimiter {
    fn check(
        &self,
        customer: &str,
        plan: &Plan,
        cost: u64,
    ) -> impl std::future::Future<Output = Result<Decision, LimiterError>> + Send {
        self.run(customer, plan, cost)
    }
}
