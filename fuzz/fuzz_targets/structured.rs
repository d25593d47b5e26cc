//! An `arbitrary` envelope-shaped JSON body (`warren_fuzz::gen`): fields present, absent,
//! null or mistyped, names and numbers at the rules' limits. Same checks as `decode`, but
//! the fuzzer starts inside validation instead of at JSON syntax.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|env: warren_fuzz::gen::Envelope| {
    let body = serde_json::to_vec(&env.to_json()).expect("a Value always serializes");
    warren_fuzz::check_decode(&body);
});
