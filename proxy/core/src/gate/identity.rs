//! Who is calling, and on which plan: a key checked against the snapshot
//! (or a shared store), a JWT verified, a customer's own limits.

use std::sync::Arc;

use crate::keys;
use crate::limiter::Limiter;
use crate::plans::Plan;
use crate::problem::Rejection;
use crate::store::{Identity, KeyRejection};

use super::Gate;

impl<L: Limiter> Gate<L> {
    /// Checks a presented key against the local snapshot: format first (no
    /// lookup for junk), then the hash. No I/O.
    pub fn authenticate_cached(&self, key: &str) -> Result<(Identity, Arc<Plan>), Rejection> {
        keys::check_format(&self.prefix, key).map_err(|_| Rejection::MalformedKey)?;
        let hash = keys::hash(key);
        let found = self.keys.snapshot().lookup(&hash, self.clock.now_ms());
        self.admit_identity(found)
    }

    /// [`Self::authenticate_cached`], then, for a well-formed key the
    /// snapshot does not know, one question to a shared store.
    pub async fn authenticate(&self, key: &str) -> Result<(Identity, Arc<Plan>), Rejection> {
        let identity = self.identify(key).await?;
        self.admit_identity(Ok(identity))
    }

    /// Whose key this is, suspended or not: self-service billing lets a
    /// suspended customer pay.
    pub async fn identify(&self, key: &str) -> Result<Identity, Rejection> {
        if let Some(jwt) = self
            .jwt
            .as_ref()
            .filter(|_| crate::jwt::looks_like_jwt(key))
        {
            return self.jwt_identity(jwt, key);
        }
        keys::check_format(&self.prefix, key).map_err(|_| Rejection::MalformedKey)?;
        let hash = keys::hash(key);
        let now = self.clock.now_ms();
        let found = match self.keys.snapshot().lookup(&hash, now) {
            Err(KeyRejection::Unknown) => self
                .keys
                .lookup_miss(&hash, now)
                .await
                .unwrap_or(Err(KeyRejection::Unknown)),
            other => other,
        };
        found.map_err(key_rejection)
    }

    /// A verified token's customer, as a key of that customer would be:
    /// its stored plan (or the token's `plan_claim`, when that names a
    /// plan), its suspension and billing state.
    fn jwt_identity(&self, jwt: &crate::jwt::Verifier, token: &str) -> Result<Identity, Rejection> {
        let v = jwt
            .verify(token, self.clock.now_ms() / 1000)
            .map_err(Rejection::InvalidToken)?;
        if crate::store::admin::customer_id_ok(&v.customer).is_err() {
            return Err(Rejection::InvalidToken(
                crate::jwt::TokenError::MissingClaim,
            ));
        }
        let mut view = self
            .keys
            .snapshot()
            .customer(&v.customer)
            .unwrap_or_default();
        if let Some(p) = v.plan.filter(|p| self.plans.load().get(p).is_some()) {
            if view.plan.as_deref() != Some(p.as_str()) {
                // The customer's limits on another plan than its record's:
                // their own cache of the plan they make, so this token's
                // plan does not evict the one its keys use.
                view.limits = view.limits.map(|own| {
                    Arc::new(crate::store::CustomLimits {
                        limits: own.limits.clone(),
                        plan: Default::default(),
                    })
                });
            }
            view.plan = Some(p.into());
        }
        Ok(Arc::new(crate::store::KeyInfo::new(
            format!("jwt:{}", v.issuer).into(),
            v.customer.into(),
            view,
        )))
    }

    fn admit_identity(
        &self,
        found: Result<Identity, KeyRejection>,
    ) -> Result<(Identity, Arc<Plan>), Rejection> {
        let identity = found.map_err(key_rejection)?;
        let plan = self.plan_of(&identity);
        if identity.suspended {
            return Err(Rejection::Suspended);
        }
        Ok((identity, plan))
    }

    /// The customer's plan; a plan name no longer in plans.yaml falls back to
    /// the default plan (`tollgate check` reports such customers).
    pub fn plan_of(&self, identity: &Identity) -> Arc<Plan> {
        let plans = self.plans.load();
        let plan = identity
            .plan
            .as_deref()
            .and_then(|p| plans.get(p))
            .unwrap_or(&plans.default_plan);
        match &identity.limits {
            None => Arc::clone(plan),
            // The customer's own limits: built once per customer record, and again
            // (uncached) when a reload replaced the plan it was built from.
            Some(own) => {
                let (base, custom) = own
                    .plan
                    .get_or_init(|| (Arc::clone(plan), plan.with_limits(own.limits.to_vec())));
                if Arc::ptr_eq(base, plan) {
                    Arc::clone(custom)
                } else {
                    plan.with_limits(own.limits.to_vec())
                }
            }
        }
    }

    /// A customer as the store knows it, without a key (for the admin
    /// API's reads), and its plan.
    pub fn customer(&self, id: Arc<str>) -> (Identity, Arc<Plan>) {
        let view = self.keys.snapshot().customer(&id).unwrap_or_default();
        let identity = Arc::new(crate::store::KeyInfo::new("".into(), id, view));
        let plan = self.plan_of(&identity);
        (identity, plan)
    }
}

fn key_rejection(r: KeyRejection) -> Rejection {
    match r {
        KeyRejection::Unknown => Rejection::UnknownKey,
        KeyRejection::Revoked => Rejection::RevokedKey,
        KeyRejection::Expired => Rejection::ExpiredKey,
    }
}
