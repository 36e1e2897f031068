//! The Redis limiter: one Lua script per request checks and charges every
//! limit of the customer's plan atomically, with the memory limiter's
//! semantics (the shared conformance suite runs against both).
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
use crate::plans::{Plan, Window};
use crate::redis_conn::RedisConn;

const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local member = ARGV[3]
local n = tonumber(ARGV[4])
local used = {}
local allowed = true
for i = 1, n do
  local b = 4 + (i - 1) * 5
  local kind, quota, w = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key, tkey = KEYS[2 * i - 1], KEYS[2 * i]
  local u
  if kind == 's' then
    u = tonumber(redis.call('GET', tkey) or '0')
    local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - w)
    if #old > 0 then
      for _, m in ipairs(old) do
        u = u - tonumber(string.match(m, ':(%d+)$'))
      end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - w)
      if u < 0 then u = 0 end
      redis.call('SET', tkey, u, 'PX', w)
    end
  else
    u = tonumber(redis.call('GET', key) or '0')
  end
  used[i] = u
  if u + cost > quota and ARGV[b + 5] == '0' then allowed = false end
end
local out = { allowed and 1 or 0 }
for i = 1, n do
  local b = 4 + (i - 1) * 5
  local kind, quota, w, wend = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local key, tkey = KEYS[2 * i - 1], KEYS[2 * i]
  local over = used[i] + cost > quota and ARGV[b + 5] == '1'
  local violated = used[i] + cost > quota and ARGV[b + 5] == '0'
  if allowed and cost > 0 then
    if kind == 's' then
      redis.call('ZADD', key, now, member .. ':' .. cost)
      redis.call('PEXPIRE', key, w)
      redis.call('SET', tkey, used[i] + cost, 'PX', w)
    else
      redis.call('INCRBY', key, cost)
      redis.call('PEXPIRE', key, wend - now + 60000)
    end
    used[i] = used[i] + cost
  end
  local remaining = quota - used[i]
  if remaining < 0 then remaining = 0 end
  local reset, wait = 0, 0
  if kind == 's' then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 then reset = math.ceil((tonumber(first[2]) + w - now) / 1000) end
    if violated then
      if cost > quota then
        wait = math.ceil(w / 1000)
      else
        local all = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
        local in_use = used[i]
        wait = math.ceil(w / 1000)
        for j = 1, #all, 2 do
          in_use = in_use - tonumber(string.match(all[j], ':(%d+)$'))
          if in_use + cost <= quota then
            wait = math.max(1, math.ceil((tonumber(all[j + 1]) + w - now) / 1000))
            break
          end
        end
      end
    end
  else
    if used[i] > 0 then reset = math.ceil((wend - now) / 1000) end
    if violated then wait = math.max(1, math.ceil((wend - now) / 1000)) end
  end
  table.insert(out, remaining)
  table.insert(out, reset)
  table.insert(out, violated and 1 or 0)
  table.insert(out, wait)
  table.insert(out, over and 1 or 0)
end
return out
"#;

pub struct RedisLimiter {
    conn: RedisConn,
    script: Script,
    clock: Arc<dyn Clock>,
    instance: String,
    seq: AtomicU64,
}

impl RedisLimiter {
    pub fn new(conn: RedisConn, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        let mut id = [0u8; 6];
        crate::keys::random_bytes(&mut id)?;
        Ok(Self {
            conn,
            script: Script::new(SCRIPT),
            clock,
            instance: hex::encode(id),
            seq: AtomicU64::new(0),
        })
    }

    pub fn conn(&self) -> &RedisConn {
        &self.conn
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
        let prefix = &self.conn.config.prefix;
        let mut inv = self.script.prepare_invoke();
        let member = format!(
            "{}:{}",
            self.instance,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        inv.arg(now).arg(cost).arg(member).arg(plan.limits.len());
        for l in &plan.limits {
            match l.window {
                Window::Sliding(w) => {
                    let base = format!("{{{prefix}:{customer}}}:s:{}:{w}", l.name);
                    inv.key(&base).key(format!("{base}:t"));
                    inv.arg("s")
                        .arg(l.quota)
                        .arg(w)
                        .arg(0)
                        .arg(u8::from(l.overage));
                }
                cal => {
                    let (start, end) = match cal {
                        Window::Day => (day_start(now), day_start(now) + DAY),
                        _ => month_bounds(now),
                    };
                    let key = format!("{{{prefix}:{customer}}}:c:{}:{start}", l.name);
                    // The second key is unused for calendar windows; passing
                    // the same key keeps KEYS aligned.
                    inv.key(&key).key(&key);
                    inv.arg("c")
                        .arg(l.quota)
                        .arg(end - start)
                        .arg(end)
                        .arg(u8::from(l.overage));
                }
            }
        }
        let out: Vec<i64> = self
            .conn
            .script(&inv)
            .await
            .map_err(|e| LimiterError::Unavailable(e.to_string()))?;
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
