//! Operations behind `tollgate keys …` and `tollgate customers …`, the same
//! for every store.

use std::path::PathBuf;

use super::{KeyRecord, Only, StoreError, UpdateStore};
use crate::clock::{parse_rfc3339, rfc3339, Millis};
use crate::keys;

/// A key just created: the raw key is returned once and never stored.
#[derive(Debug)]
pub struct NewKey {
    pub raw: String,
    pub record: KeyRecord,
}

/// A customer id the stores and headers can carry.
pub fn customer_id_ok(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "customer id `{id}` must be 1-255 visible ASCII characters (e.g. a Stripe cus_… id)"
        )))
    }
}

/// A key's `meta` holds at most this many fields...
pub const META_MAX_FIELDS: usize = 16;
/// ...named by 1-64 of `[A-Za-z0-9_.-]`, each a number, a boolean or a
/// string of at most this many characters: a flat, bounded object.
pub const META_MAX_STRING: usize = 256;

/// A key's `meta`: a flat JSON object within the bounds.
pub fn check_meta(meta: &serde_json::Map<String, serde_json::Value>) -> Result<(), StoreError> {
    use serde_json::Value;
    let bad = |why: String| Err(StoreError::Invalid(format!("`meta`: {why}")));
    if meta.len() > META_MAX_FIELDS {
        return bad(format!("at most {META_MAX_FIELDS} fields"));
    }
    for (k, v) in meta {
        if !crate::plans::valid_token(k) {
            return bad(format!(
                "field names are 1-64 of letters, digits, `_`, `-`, `.` (`{k}` is not)"
            ));
        }
        match v {
            Value::Bool(_) | Value::Number(_) => {}
            Value::String(s) if s.chars().count() <= META_MAX_STRING => {}
            _ => {
                return bad(format!(
                    "`{k}` must be a number, a boolean or a string of at most {META_MAX_STRING} characters"
                ))
            }
        }
    }
    Ok(())
}

/// A key name: at most 200 characters, no control characters.
fn check_name(name: &str) -> Result<(), StoreError> {
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(
            "`name` must be at most 200 characters, without control characters".into(),
        ));
    }
    Ok(())
}

fn new_record(
    prefix: &str,
    customer: &str,
    name: Option<&str>,
    now: Millis,
    expires: Option<Millis>,
) -> Result<NewKey, StoreError> {
    let io = |e| StoreError::Io(PathBuf::from("<os random>"), e);
    let raw = keys::generate(prefix).map_err(io)?;
    let record = KeyRecord {
        id: keys::new_key_id().map_err(io)?,
        hash: hex::encode(keys::hash(&raw)),
        start: raw.get(..prefix.len() + 4).unwrap_or(prefix).to_owned(),
        customer: customer.to_owned(),
        name: name.map(str::to_owned),
        meta: None,
        created: rfc3339(now),
        expires: expires.map(rfc3339),
        revoked: None,
    };
    Ok(NewKey { raw, record })
}

fn customer_only<'a>(customers: &'a [&'a str]) -> Only<'a> {
    Only {
        customers,
        ..Only::default()
    }
}

fn key_only<'a>(key_ids: &'a [&'a str]) -> Only<'a> {
    Only {
        key_ids,
        ..Only::default()
    }
}

pub struct CreateKey<'a> {
    pub customer: &'a str,
    pub plan: Option<&'a str>,
    pub name: Option<&'a str>,
    pub expires: Option<Millis>,
    /// `plan` may change the plan of an existing customer (and so of all
    /// its keys); without it that is refused.
    pub set_plan: bool,
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
}

pub fn create_key(
    store: &impl UpdateStore,
    prefix: &str,
    req: CreateKey<'_>,
    now: Millis,
) -> Result<NewKey, StoreError> {
    customer_id_ok(req.customer)?;
    if let Some(n) = req.name {
        check_name(n)?;
    }
    if let Some(m) = &req.meta {
        check_meta(m)?;
    }
    let mut new = new_record(prefix, req.customer, req.name, now, req.expires)?;
    new.record.meta = req.meta.clone();
    let record = new.record.clone();
    store.update_only(customer_only(&[req.customer]), |d| {
        if let (Some(plan), Some(c), false) = (req.plan, d.customers.get(req.customer), req.set_plan) {
            if c.plan.as_deref() != Some(plan) {
                return Err(StoreError::Conflict(format!(
                    "customer {} is on plan {}; a new key with plan {plan} would move all its keys: say so with set_plan (--set-plan), or leave the plan out",
                    req.customer,
                    c.plan.as_deref().unwrap_or("(default)")
                )));
            }
        }
        let c = d.customers.entry(req.customer.to_owned()).or_default();
        if let Some(plan) = req.plan {
            c.plan = Some(plan.to_owned());
        }
        d.keys.push(record);
        Ok(())
    })?;
    Ok(new)
}

pub fn revoke(store: &impl UpdateStore, id: &str, now: Millis) -> Result<KeyRecord, StoreError> {
    store.update_only(key_only(&[id]), |d| {
        let k = d
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        if k.revoked.is_none() {
            k.revoked = Some(rfc3339(now));
        }
        Ok(k.clone())
    })
}

/// Issues a new key for the same customer; the old one expires after `grace`.
pub fn rotate(
    store: &impl UpdateStore,
    prefix: &str,
    id: &str,
    grace: Millis,
    now: Millis,
) -> Result<NewKey, StoreError> {
    store.update_only(key_only(&[id]), |d| {
        let old = d
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        if old.revoked.is_some() {
            return Err(StoreError::Conflict(format!(
                "key {id} is revoked; create a new key instead"
            )));
        }
        let old_expiry = old.expires.as_deref().and_then(parse_rfc3339);
        let until = now.saturating_add(grace);
        let new_expiry = old_expiry.map_or(until, |e| e.min(until));
        old.expires = Some(rfc3339(new_expiry));
        let (customer, name) = (old.customer.clone(), old.name.clone());
        let meta = old.meta.clone();
        let mut new = new_record(prefix, &customer, name.as_deref(), now, old_expiry)?;
        new.record.meta = meta;
        d.keys.push(new.record.clone());
        Ok(new)
    })
}

pub fn set_plan(store: &impl UpdateStore, customer: &str, plan: &str) -> Result<(), StoreError> {
    customer_id_ok(customer)?;
    store.update_only(customer_only(&[customer]), |d| {
        d.customers.entry(customer.to_owned()).or_default().plan = Some(plan.to_owned());
        Ok(())
    })
}

/// Replaces a customer's limits (`None`: back to its plan's). A customer
/// not in the store yet is created, as `set_plan` does.
pub fn set_limits(
    store: &impl UpdateStore,
    customer: &str,
    limits: Option<Vec<crate::plans::custom::LimitSpec>>,
) -> Result<(), StoreError> {
    customer_id_ok(customer)?;
    store.update_only(customer_only(&[customer]), |d| {
        let has = d
            .customers
            .get(customer)
            .is_some_and(|c| c.limits.is_some());
        if limits.is_none() && !has {
            return Err(StoreError::NotFound(format!(
                "own limits of customer {customer} (its plan's apply)"
            )));
        }
        d.customers.entry(customer.to_owned()).or_default().limits = limits;
        Ok(())
    })
}

pub fn set_suspended(
    store: &impl UpdateStore,
    customer: &str,
    suspended: bool,
) -> Result<(), StoreError> {
    store.update_only(customer_only(&[customer]), |d| {
        let c = d
            .customers
            .get_mut(customer)
            .ok_or_else(|| StoreError::NotFound(format!("customer {customer}")))?;
        c.suspended = suspended;
        // An operator's resume also lifts a suspension billing imposed.
        if let (false, Some(b)) = (suspended, c.billing.as_mut()) {
            b.suspended = false;
        }
        Ok(())
    })
}

/// A valid key that expires within this is `expiring`: a rotated key in
/// its grace period, or one due to be rotated.
pub const EXPIRING_WITHIN: Millis = 7 * 86_400_000;

/// `revoked`, `expired`, `expiring` (valid, expires within
/// [`EXPIRING_WITHIN`]), or `active`.
pub fn status(k: &KeyRecord, now: Millis) -> &'static str {
    let expires = k.expires.as_deref().map(|e| parse_rfc3339(e).unwrap_or(0));
    status_of(k.revoked.is_some(), expires, now)
}

/// [`status`] of a key revoked or not, with this expiry (an unparsable
/// one is 0: expired).
pub fn status_of(revoked: bool, expires: Option<Millis>, now: Millis) -> &'static str {
    match expires {
        _ if revoked => "revoked",
        Some(t) if t <= now => "expired",
        Some(t) if t - now <= EXPIRING_WITHIN => "expiring",
        _ => "active",
    }
}
