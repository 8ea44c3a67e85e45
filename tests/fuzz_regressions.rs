//! Every input kept under tests/fuzz/regressions/<target>/ (crashes found by fuzzing, and seeds)
//! goes through its decoder again: none may panic. Every fuzz target has such a folder, with at
//! least one input, so that the replay cannot pass by finding nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What a fuzz target runs on its input.
type Target = fn(&[u8]);

/// Each fuzz target of tests/fuzz/fuzz_targets, by name, and what it runs.
const TARGETS: [(&str, Target); 4] = [
    ("image_decode", aiaas::fuzzing::image_decode),
    ("v2_parse", aiaas::fuzzing::v2_parse),
    ("json_instances", aiaas::fuzzing::json_instances),
    ("tokenize", aiaas::fuzzing::tokenize),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

/// Runs every input of `target`'s regression folder through `run`; returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = fuzz_dir().join("regressions").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: each fuzz target keeps its inputs there",
            dir.display()
        )
    });
    let mut n = 0;
    for entry in entries {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        run(&data);
        n += 1;
    }
    n
}

#[test]
fn fuzz_regressions_do_not_panic() {
    for (target, run) in TARGETS {
        assert!(replay(target, run) > 0, "no regression inputs for {target}");
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let targets: BTreeSet<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("tests/fuzz/fuzz_targets")
        .map(|entry| {
            let path = entry.unwrap().path();
            path.file_stem().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    let replayed: BTreeSet<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(targets, replayed);
}
