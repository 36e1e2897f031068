//! Any request path: refused, or routed on a path that an upstream decoding
//! what Tollgate forwards reads exactly, with nothing left to resolve.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::gate::canonical_path;
use tollgate_core::pct;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = canonical_path(raw) {
        let forwarded = c.forward.as_deref().unwrap_or(raw);
        if raw != "*" {
            assert_eq!(pct::decode(forwarded, false), c.routed);
            assert!(!c.routed.contains("//"));
            assert!(!c.routed.split('/').any(|s| s == "." || s == ".."));
        }
        let again = canonical_path(forwarded).expect("a forwarded path is canonical");
        assert_eq!(again.routed, c.routed);
        assert_eq!(again.forward, None);
    }
});
