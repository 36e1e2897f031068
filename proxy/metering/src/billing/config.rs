//! `metering.sinks` in tollgate.yaml: each item names one provider, whose
//! own module parses and checks its settings.

use tollgate_core::diag::Check;

/// A billing sink, secrets resolved.
#[derive(Clone)]
pub enum SinkConfig {
    Stripe {
        name: String,
        v2: bool,
        base_url: String,
        stream_url: String,
        api_key: String,
        version: String,
    },
    OpenMeter {
        name: String,
        url: String,
        token: Option<String>,
        source: String,
    },
    Lago {
        name: String,
        url: String,
        api_key: String,
    },
    Webhook {
        name: String,
        url: String,
        secret: String,
    },
}

impl std::fmt::Debug for SinkConfig {
    // Secrets stay out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SinkConfig({})", self.name())
    }
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Stripe { name, .. }
            | SinkConfig::OpenMeter { name, .. }
            | SinkConfig::Lago { name, .. }
            | SinkConfig::Webhook { name, .. } => name,
        }
    }

    /// One item of `metering.sinks`, found at `path`: a one-key mapping
    /// from the provider to its settings.
    pub fn parse(cx: &mut Check<'_>, path: &str, item: &serde_yaml::Value) -> Option<Self> {
        let map = item.as_mapping().filter(|m| m.len() == 1);
        let Some((kind, body)) = map.and_then(|m| m.iter().next()) else {
            cx.err(
                path,
                "a sink is one of `stripe:`, `openmeter:`, `lago:` or `webhook:` with its settings",
                Some("e.g. - stripe: { api_key_env: STRIPE_API_KEY }"),
            );
            return None;
        };
        let kind = kind.as_str().unwrap_or("");
        let p = format!("{path}.{kind}");
        let sink = match kind {
            "stripe" => super::stripe::parse_config(cx, &p, body),
            "openmeter" => super::openmeter::parse_config(cx, &p, body),
            "lago" => super::lago::parse_config(cx, &p, body),
            "webhook" => super::webhook::parse_config(cx, &p, body),
            other => {
                cx.err(
                    path,
                    format!("unknown sink `{other}`"),
                    Some("use stripe, openmeter, lago or webhook"),
                );
                None
            }
        };
        if sink
            .as_ref()
            .is_some_and(|s| s.name() == crate::alerts::ALERTS)
        {
            cx.err(
                &format!("{p}.name"),
                "`alerts` names the alert webhook in `tollgate billing`; call the sink something else",
                None,
            );
        }
        sink
    }
}
