//! Any plans.yaml: plans, or located errors; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::diag::Source;
use tollgate_core::plans::Plans;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(d) = Plans::parse(&Source::new("plans.yaml".as_ref(), text.to_owned())) {
            assert!(!d.0.is_empty(), "a refusal says why");
        }
    }
});
