//! Any Authorization or X-API-Key value: a key, no key, or a refusal; never
//! a panic, and a key is only ever what the header carried.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::gate::{bearer_token, extract_key, is_bearer};
use tollgate_core::keys;

fuzz_target!(|data: &[u8]| {
    let _ = is_bearer(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = keys::check_format("tg_live_", s);
        let _ = bearer_token(s);
    }
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    for name in [http::header::AUTHORIZATION.as_str(), "x-api-key"] {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::HeaderName::from_static(name), value.clone());
        if let Ok(Some((key, _))) = extract_key(&headers) {
            let text = value.to_str().expect("a key is text");
            assert!(text.contains(key));
        }
    }
});
