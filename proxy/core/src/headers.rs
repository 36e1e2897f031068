//! Rate-limit response headers: `X-RateLimit-*` (the de-facto convention)
//! and `RateLimit-Policy` / `RateLimit` per draft-ietf-httpapi-ratelimit-headers
//! (draft 10/11: a List of named policies, `q`/`w` on the policy, `r`/`t` on
//! the current state).

use crate::limiter::Decision;

/// The header values for one keyed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    pub reset: u64,
    /// `RateLimit`: every policy with its remaining units and reset.
    pub ratelimit: String,
}

impl RateHeaders {
    /// None for an unlimited plan: there is nothing to advertise.
    pub fn render(decision: &Decision) -> Option<Self> {
        let tight = decision.tightest()?;
        let mut ratelimit = String::with_capacity(24 * decision.policies.len());
        for p in decision.policies.iter().filter(|p| !p.concurrent) {
            if !ratelimit.is_empty() {
                ratelimit.push_str(", ");
            }
            let mut n = itoa::Buffer::new();
            ratelimit.push('"');
            ratelimit.push_str(&p.name);
            ratelimit.push_str("\";r=");
            ratelimit.push_str(n.format(p.remaining));
            ratelimit.push_str(";t=");
            ratelimit.push_str(n.format(p.reset_secs));
        }
        Some(Self {
            limit: tight.quota,
            remaining: tight.remaining,
            reset: tight.reset_secs,
            ratelimit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::PolicyStatus;

    fn status(name: &str, quota: u64, remaining: u64, reset: u64) -> PolicyStatus {
        PolicyStatus {
            name: name.into(),
            quota,
            remaining,
            reset_secs: reset,
            violated: false,
            concurrent: false,
        }
    }

    #[test]
    fn x_ratelimit_describes_the_policy_closest_to_exhaustion() {
        let d = Decision {
            allowed: true,
            policies: vec![status("burst", 5, 4, 1), status("daily", 100, 42, 3600)],
            retry_after_secs: 0,
            overage: false,
            overage_meter: None,
            lease: None,
        };
        let h = RateHeaders::render(&d).unwrap();
        // 42/100 is closer to exhaustion than 4/5.
        assert_eq!((h.limit, h.remaining, h.reset), (100, 42, 3600));
        assert_eq!(h.ratelimit, "\"burst\";r=4;t=1, \"daily\";r=42;t=3600");
    }

    #[test]
    fn ties_pick_the_later_reset_and_unlimited_renders_nothing() {
        let d = Decision {
            allowed: false,
            policies: vec![status("burst", 5, 0, 1), status("daily", 100, 0, 600)],
            retry_after_secs: 600,
            overage: false,
            overage_meter: None,
            lease: None,
        };
        assert_eq!(RateHeaders::render(&d).unwrap().reset, 600);
        assert!(RateHeaders::render(&Decision::unlimited()).is_none());
    }
}
