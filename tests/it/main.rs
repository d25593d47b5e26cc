//! warren's integration and fault tests, in one test binary (`cargo test --test it`).
//!
//! Each module is one area (formerly its own `tests/<name>.rs` binary); `common` and
//! `support` are the shared helpers. One binary links once instead of once per area, and
//! shares what is meant to be shared per process: the private 3-node cluster
//! (`support::cluster`) is started once for the whole binary.
//!
//! Run one area with `cargo test --test it dead_letters::`, one test with
//! `cargo test --test it dead_letters::replay_by_id_replays_only_that_one -- --exact`.
//! See docs/testing.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

mod acks;
mod admin_api;
mod bad_input;
mod broker_restart;
mod cancel;
mod cancel_common;
mod cancel_jobs;
mod chain_faults;
mod chains;
mod cluster;
mod connection_faults;
mod core_paths;
mod dead_letters;
mod delays;
mod fanin_faults;
mod flow_limits;
mod flow_priorities;
mod harness_selftest;
mod held_batches;
mod invoke_retry;
mod metrics;
mod parallel;
mod process_faults;
mod publisher_returns;
mod pubsub;
mod pubsub_faults;
mod retry_faults;
mod retry_policy;
mod schedules;
mod split_faults;
mod split_jobs;
mod status;
mod time_limits;
mod tls;
mod tracing;
mod unique_tasks;
mod volume;
mod web_admin;
mod wire_conformance;

/// The package sets `autotests = false`, so a test file dropped into `tests/` would never
/// be compiled or run, and neither would a file in `tests/it/` that no `mod` names. Fail
/// instead: new tests go into a module of this binary.
#[test]
fn every_test_file_is_part_of_the_it_binary() {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let rs_files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .collect();
        files.sort();
        files
    };
    let outside: Vec<_> = rs_files(&tests);
    assert!(
        outside.is_empty(),
        "not part of any test binary (autotests = false): {outside:?}; \
         move each into tests/it/ and add `mod <name>;` to tests/it/main.rs"
    );
    let main = std::fs::read_to_string(tests.join("it").join("main.rs")).expect("main.rs");
    let undeclared: Vec<_> = rs_files(&tests.join("it"))
        .into_iter()
        .filter(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            stem != "main" && !main.lines().any(|l| l.trim() == format!("mod {stem};"))
        })
        .collect();
    assert!(
        undeclared.is_empty(),
        "in tests/it/ but not declared in tests/it/main.rs: {undeclared:?}; add `mod <name>;`"
    );
}
