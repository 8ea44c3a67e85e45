//! The Hugging Face fixtures (`.fixtures/hf`, built by `.ci/hf-fixtures.sh`): where they are,
//! their reference answers, a server on them, and float comparisons.

use serde_json::Value;

use super::Server;

/// Where the fixtures are: `AIAAS_HF_FIXTURES`, else `.fixtures/hf` in the repository.
pub fn fixtures() -> std::path::PathBuf {
    let dir = std::env::var_os("AIAAS_HF_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".fixtures/hf"));
    assert!(
        dir.join(".stamp").exists(),
        "no Hugging Face fixtures in {}: run .ci/hf-fixtures.sh (make test does)",
        dir.display()
    );
    dir
}

pub fn reference(model: &str) -> Value {
    let path = fixtures().join(model).join("reference.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

pub fn server(models: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--load-model", models];
    args.extend_from_slice(extra);
    let s = Server::start(&fixtures(), &args);
    s.wait_ready();
    s
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
