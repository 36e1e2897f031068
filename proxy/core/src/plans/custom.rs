//! Per-customer limits: the limits a plan's customers have, replaced for
//! one customer (an enterprise deal, a custom SLA). Stored with the
//! customer in the key store, shaped as a plan's limit in plans.yaml.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{policy_header, valid_token, Limit, Plan, Window};

/// One limit as stored and as the admin API and CLI take it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub name: String,
    pub requests: u64,
    pub per: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overage: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage_meter: Option<String>,
}

impl LimitSpec {
    /// The limit it describes, when valid.
    pub fn limit(&self) -> Option<Limit> {
        Some(Limit {
            name: self.name.as_str().into(),
            quota: self.requests,
            window: Window::parse(&self.per)?,
            overage: self.overage || self.overage_meter.is_some(),
            overage_meter: self.overage_meter.as_deref().map(Into::into),
        })
        .filter(|l| l.quota > 0 && valid_token(&l.name))
    }
}

/// The largest quota: the largest integer JSON numbers hold exactly.
pub const MAX_REQUESTS: u64 = (1 << 53) - 1;

/// A whole number as JSON Schema counts one (`717` or `717.0`), within
/// [`MAX_REQUESTS`].
fn whole(v: &Value) -> Option<u64> {
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_REQUESTS as f64)
            .map(|f| f as u64)
    })?;
    (n <= MAX_REQUESTS).then_some(n)
}

/// A problem with one field: its path (`limits[1].per`) and what is wrong.
pub type FieldError = (String, String);

/// Why a list of limits was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitErrors {
    pub fields: Vec<FieldError>,
    /// Every problem is one a schema cannot describe (a name given
    /// twice): the admin API answers 422 rather than 400.
    pub semantic: bool,
}

/// Reads the list of limits at `path`: every limit checked like a plan's
/// in plans.yaml, every problem named by its field.
pub fn parse_limit_specs(v: &Value, path: &str) -> Result<Vec<LimitSpec>, LimitErrors> {
    let mut errors = Vec::new();
    let mut duplicates = Vec::new();
    let Some(items) = v.as_array() else {
        return Err(LimitErrors {
            fields: vec![(path.to_owned(), "must be a list of limits".into())],
            semantic: false,
        });
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(obj) = item.as_object() else {
            errors.push((p, "must be an object like {\"name\": \"burst\", \"requests\": 10, \"per\": \"second\"}".into()));
            continue;
        };
        for k in obj.keys() {
            if !["name", "requests", "per", "overage", "overage_meter"].contains(&k.as_str()) {
                errors.push((
                    format!("{p}.{k}"),
                    "unknown field; a limit takes name, requests, per, overage, overage_meter"
                        .into(),
                ));
            }
        }
        let name = obj.get("name").and_then(Value::as_str);
        match name {
            None => errors.push((format!("{p}.name"), "is required (a string)".into())),
            Some(n) if !valid_token(n) => errors.push((
                format!("{p}.name"),
                format!("`{n}` may only hold letters, digits, `_`, `-` and `.`"),
            )),
            Some(crate::alerts::CREDITS) => errors.push((
                format!("{p}.name"),
                "`credits` names a customer's prepaid credits in alerts; call the limit something else".into(),
            )),
            Some(n) if !seen.insert(n.to_owned()) => {
                duplicates.push((format!("{p}.name"), format!("`{n}` is given twice")))
            }
            _ => {}
        }
        let requests = obj.get("requests").and_then(whole).filter(|r| *r > 0);
        if requests.is_none() {
            errors.push((
                format!("{p}.requests"),
                format!("must be a positive whole number, at most {MAX_REQUESTS}"),
            ));
        }
        let per = obj.get("per").and_then(Value::as_str);
        if !per.is_some_and(canonical_window) {
            errors.push((
                format!("{p}.per"),
                "must be second, minute, hour, day, month, or whole seconds up to 1h like 10s"
                    .into(),
            ));
        }
        let overage = match obj.get("overage") {
            None => Some(false),
            Some(v) => v.as_bool(),
        };
        if overage.is_none() {
            errors.push((format!("{p}.overage"), "must be true or false".into()));
        }
        let meter = match obj.get("overage_meter") {
            None => Ok(None),
            Some(Value::String(m)) if valid_token(m) => Ok(Some(m.clone())),
            Some(_) => Err(()),
        };
        if meter.is_err() {
            errors.push((
                format!("{p}.overage_meter"),
                "must be a meter name (letters, digits, `_`, `-`, `.`)".into(),
            ));
        }
        if let (Some(name), Some(requests), Some(per), Some(overage), Ok(overage_meter)) =
            (name, requests, per, overage, meter)
        {
            out.push(LimitSpec {
                name: name.to_owned(),
                requests,
                per: per.to_owned(),
                overage,
                overage_meter,
            });
        }
    }
    if errors.is_empty() && duplicates.is_empty() {
        return Ok(out);
    }
    let semantic = errors.is_empty();
    errors.extend(duplicates);
    Err(LimitErrors {
        fields: errors,
        semantic,
    })
}

/// `per` in the one spelling each window has: `second`..`month`, `1h`,
/// `<1-60>m` or `<1-3600>s` without leading zeros (what the admin API's
/// schema says; plans.yaml is more lenient).
fn canonical_window(per: &str) -> bool {
    if matches!(per, "second" | "minute" | "hour" | "day" | "month" | "1h") {
        return true;
    }
    let (num, max) = match (per.strip_suffix('s'), per.strip_suffix('m')) {
        (Some(n), _) => (n, 3600),
        (None, Some(n)) => (n, 60),
        _ => return false,
    };
    !num.starts_with('0')
        && !num.is_empty()
        && num.bytes().all(|b| b.is_ascii_digit())
        && num.parse::<u32>().is_ok_and(|n| (1..=max).contains(&n))
}

impl Plan {
    /// This plan with `limits` instead of its own (name, meter kept).
    pub fn with_limits(&self, limits: Vec<Limit>) -> Arc<Plan> {
        Arc::new(Plan {
            name: Arc::clone(&self.name),
            policy_header: policy_header(&limits),
            limits,
            meter: self.meter.clone(),
            billed: self.billed,
            display: self.display.clone(),
            credits: self.credits.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named() {
        let v: Value = serde_json::json!([
            {"name": "burst", "requests": 50, "per": "second"},
            {"name": "burst", "requests": 0, "per": "fortnight", "overage": "yes", "colour": 1},
            "ten a day",
        ]);
        let errs = parse_limit_specs(&v, "limits").unwrap_err();
        assert!(!errs.semantic);
        let paths: Vec<&str> = errs.fields.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "limits[1].colour",
                "limits[1].requests",
                "limits[1].per",
                "limits[1].overage",
                "limits[2]",
                "limits[1].name"
            ]
        );
        let ok = parse_limit_specs(
            &serde_json::json!([{"name": "monthly", "requests": 1000000, "per": "month", "overage_meter": "extra"}]),
            "limits",
        )
        .unwrap();
        let l = ok[0].limit().unwrap();
        assert_eq!(
            (l.quota, l.window, l.overage),
            (1_000_000, Window::Month, true)
        );
        // Only a repeated name: a problem no schema states, told apart.
        let twice = serde_json::json!([
            {"name": "burst", "requests": 5, "per": "second"},
            {"name": "burst", "requests": 50, "per": "minute"}
        ]);
        assert!(parse_limit_specs(&twice, "limits").unwrap_err().semantic);
        // No limits at all: unlimited, as a plan with `limits: []`.
        assert_eq!(
            parse_limit_specs(&serde_json::json!([]), "limits").unwrap(),
            vec![]
        );
    }
}
