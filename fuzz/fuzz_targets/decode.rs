//! Arbitrary bytes as a delivery body: `Envelope::from_bytes` never panics, and what it
//! accepts obeys docs/wire-format.md, re-encodes to an equal envelope and reads the same
//! through `validate::identity` (see `warren_fuzz::check_decode`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    warren_fuzz::check_decode(body);
});
