//! Any webhook signature header and body, for every provider: verified or
//! refused, never a panic; and a payload that verifies parses or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::lifecycle::{events, signature, Provider};

fuzz_target!(|data: &[u8]| {
    // The first line is the header, the rest the body.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (head, body) = data.split_at(split);
    let Ok(header) = std::str::from_utf8(head) else {
        return;
    };
    let secrets = ["whsec_fuzz".to_owned()];
    let _ = signature::stripe(Some(header), body, &secrets, 1_700_000_000, 300);
    let _ = signature::paddle(Some(header), body, &secrets, 1_700_000_000, 300);
    let _ = signature::paystack(Some(header), body, &secrets);
    let parts: Vec<&str> = header.splitn(3, '|').collect();
    let h = signature::StandardHeaders {
        id: parts.first().copied(),
        timestamp: parts.get(1).copied(),
        signature: parts.get(2).copied(),
    };
    let _ = signature::standard(h, body, &secrets, 1_700_000_000, 300);
    for p in Provider::ALL {
        let _ = events::parse(p, body, Some("msg_1"), Some(1_700_000_000), 1_700_000_000_000);
    }
});
