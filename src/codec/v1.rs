//! The /v1 JSON request body: `{"instances": [...], "parameters"?: {"top_k"?: n, "scores"?: "all"}}`.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::instance::{numeric_body, numeric_instances, Instance};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest<I = Vec<Instance>> {
    pub instances: I,
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

/// Output options, in `parameters` or the query string.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    /// Classifiers: also the k best labels, best first.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Classifiers: `all` scores even where a model has more than ten labels.
    #[serde(default)]
    pub scores: Option<Scores>,
}

/// Which scores a classifier answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scores {
    All,
}

impl Parameters {
    /// These, with what they leave open taken from `fallback`.
    pub fn or(self, fallback: Parameters) -> Parameters {
        Parameters {
            top_k: self.top_k.or(fallback.top_k),
            scores: self.scores.or(fallback.scores),
        }
    }

    pub fn output_options(self) -> super::OutputOptions {
        super::OutputOptions {
            top_k: self.top_k,
            all_scores: self.scores == Some(Scores::All),
        }
    }
}

/// Parses a /v1 JSON body: numeric instances through the fast scanner, anything else (and
/// every error) through serde, so that what is accepted and every message are serde's.
pub fn parse_request(body: &[u8]) -> Result<PredictRequest, serde_json::Error> {
    if let Some(instances) = numeric_body(body) {
        return Ok(PredictRequest {
            instances,
            parameters: None,
        });
    }
    if let Ok(raw) = serde_json::from_slice::<PredictRequest<&RawValue>>(body) {
        if let Some(instances) = numeric_instances(raw.instances.get()) {
            return Ok(PredictRequest {
                instances,
                parameters: raw.parameters,
            });
        }
    }
    serde_json::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_and_slow_bodies_parse_alike() {
        let r = parse_request(br#"{"parameters": {"top_k": 2}, "instances": [[1, 2], [3, 4]]}"#)
            .unwrap();
        assert_eq!(r.parameters.and_then(|p| p.top_k), Some(2));
        assert_eq!(r.instances.len(), 2);
        let r = parse_request(b" { \"instances\" :[[1, 2], 3]}\n").unwrap();
        assert!(r.parameters.is_none());
        assert_eq!(r.instances[1], Instance::Number(3.0));
        assert_eq!(
            numeric_body(br#"{"instances": [1]}"#),
            numeric_instances("[1]")
        );
        for not_exactly in [
            &br#"{"instances": [1], "parameters": {}}"#[..],
            br#"{"instances": [1]} x"#,
            br#"{"instance": [1]}"#,
            br#"{"instances": [1]"#,
        ] {
            assert_eq!(numeric_body(not_exactly), None);
        }
        let r = parse_request(br#"{"instances": ["text", 1]}"#).unwrap();
        assert_eq!(r.instances[0], Instance::Text("text".into()));
        assert_eq!(r.instances[1], Instance::Number(1.0));
        // errors are serde's, whichever path looked first
        let e = parse_request(br#"{"instances": [1], "extra": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
        let e = parse_request(br#"{"instances": [[[1, 2], [[3]]]]}"#).unwrap_err();
        assert!(e.to_string().contains("rectangular"), "{e}");
        assert!(parse_request(b"{\"instances\": [1,").unwrap_err().is_eof());
    }
}
