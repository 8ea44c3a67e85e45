//! Every input kept under tests/fuzz/regressions/<target>/ (crashes found by fuzzing, and seeds)
//! goes through its decoder again: none may panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let data = std::fs::read(entry.path()).unwrap();
        run(&data);
        n += 1;
    }
    n
}

#[test]
fn fuzz_regressions_do_not_panic() {
    let total = replay("image_decode", aiaas::fuzzing::image_decode)
        + replay("v2_parse", aiaas::fuzzing::v2_parse)
        + replay("json_instances", aiaas::fuzzing::json_instances)
        + replay("tokenize", aiaas::fuzzing::tokenize);
    assert!(total > 0, "no regression inputs found");
}
