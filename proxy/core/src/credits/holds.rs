//! Credits held by requests in flight, so concurrent calls cannot spend
//! the same balance twice (`reserve:` on a route).

use std::sync::Arc;

/// Credits held by requests in flight (`reserve:` on a route), per
/// customer: what the gate admits against is the balance minus these.
/// In memory only: a hold lasts as long as its request, and a restart
/// ends both.
#[derive(Debug, Default)]
pub struct Holds {
    held: std::sync::Mutex<std::collections::HashMap<Arc<str>, u64>>,
    /// The sum of `held`: while it is 0, a request that holds nothing is
    /// admitted without the lock.
    total: std::sync::atomic::AtomicU64,
}

impl Holds {
    /// Whether a request holding `want` may start: the balance not held by
    /// others must be above zero and cover `want`. `seen` is the balance
    /// the caller read; `read` reads it again under the lock, so a request
    /// that ends (charged, then given back) between the two cannot make it
    /// look larger than it is. The hold is given back when the [`Hold`] is
    /// settled or dropped.
    pub fn take(
        self: &Arc<Self>,
        customer: &Arc<str>,
        want: u64,
        seen: i64,
        read: impl FnOnce() -> i64,
    ) -> Option<Hold> {
        use std::sync::atomic::Ordering;
        if want == 0 && self.total.load(Ordering::Acquire) == 0 {
            return (seen > 0).then(Hold::none);
        }
        let mut h = crate::sync::lock(&self.held);
        let held = h.get(customer).copied().unwrap_or(0);
        let available = i128::from(read()) - i128::from(held);
        if available <= 0 || available < i128::from(want) {
            return None;
        }
        if want == 0 {
            return Some(Hold::none());
        }
        h.insert(customer.clone(), held.saturating_add(want));
        self.total.fetch_add(want, Ordering::AcqRel);
        Some(Hold {
            owner: Some((self.clone(), customer.clone())),
            amount: std::sync::atomic::AtomicU64::new(want),
        })
    }

    /// Holds `want` for `customer` whatever the balance: where the balance
    /// is checked elsewhere (a shared store, with what is held here), a
    /// refused call drops its hold.
    pub fn claim(self: &Arc<Self>, customer: &Arc<str>, want: u64) -> Hold {
        use std::sync::atomic::Ordering;
        if want == 0 {
            return Hold::none();
        }
        let mut h = crate::sync::lock(&self.held);
        let held = h.entry(customer.clone()).or_insert(0);
        *held = held.saturating_add(want);
        self.total.fetch_add(want, Ordering::AcqRel);
        Hold {
            owner: Some((self.clone(), customer.clone())),
            amount: std::sync::atomic::AtomicU64::new(want),
        }
    }

    fn give_back(&self, customer: &Arc<str>, want: u64) {
        let mut h = crate::sync::lock(&self.held);
        if let Some(held) = h.get_mut(customer) {
            debug_assert!(*held >= want, "a hold given back twice");
            *held = held.saturating_sub(want);
            if *held == 0 {
                h.remove(customer);
            }
        }
        self.total
            .fetch_sub(want, std::sync::atomic::Ordering::AcqRel);
    }

    /// What `customer`'s requests in flight hold.
    pub fn held(&self, customer: &str) -> u64 {
        crate::sync::lock(&self.held)
            .get(customer)
            .copied()
            .unwrap_or(0)
    }
}

/// One request's hold on its customer's credits: given back once, by
/// [`Hold::settle`] when its usage is charged, or when dropped (however
/// the request ended, a panic included).
#[derive(Debug, Default)]
pub struct Hold {
    owner: Option<(Arc<Holds>, Arc<str>)>,
    amount: std::sync::atomic::AtomicU64,
}

impl Hold {
    /// No hold.
    pub fn none() -> Self {
        Self::default()
    }

    /// What is held (0 once settled).
    pub fn amount(&self) -> u64 {
        self.amount.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Gives the hold back (the request's usage is charged); a second call
    /// does nothing.
    pub fn settle(&self) {
        let n = self.amount.swap(0, std::sync::atomic::Ordering::AcqRel);
        if let (Some((holds, customer)), true) = (&self.owner, n > 0) {
            holds.give_back(customer, n);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_admit_against_what_others_do_not_hold() {
        let h = Arc::new(Holds::default());
        let c: Arc<str> = "cus".into();
        let take = |want| h.take(&c, want, 100, || 100);
        let (a, b) = (take(40).unwrap(), take(40).unwrap());
        assert!(take(40).is_none(), "20 left unheld");
        let exact = take(20).unwrap();
        assert_eq!(exact.amount(), 20, "exactly covered");
        assert!(
            take(0).is_none(),
            "nothing unheld: not even a request without a reserve"
        );
        a.settle();
        a.settle();
        assert_eq!(h.held("cus"), 60, "settled once");
        assert!(take(0).is_some());
        // The balance is read again under the lock: one seen before a
        // charge does not count.
        assert!(h.take(&c, 10, 100, || 60).is_none());
        assert!(
            h.take(&c, 0, 0, || 0).is_none(),
            "a balance at zero admits nothing"
        );
        drop(b);
        drop(exact);
        assert_eq!(h.held("cus"), 0, "dropped holds are given back");
        assert!(h.held.lock().unwrap().is_empty(), "no entry left behind");
        assert_eq!(h.total.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(h
            .take(&c, 0, 5, || unreachable!("nothing held: no lock"))
            .is_some());
    }
}
