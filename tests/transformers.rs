//! Hugging Face transformer models served from a model.toml alone, against the original
//! libraries' answers: real all-MiniLM-L6-v2 weights (sentence-transformers' embeddings), and a
//! random BERT sequence classifier and cross-encoder (eager `transformers` logits), traced with
//! the project's torch by `tests/fixtures/hf/build.py` into `.fixtures/hf` (`make test` builds
//! them once: `.ci/hf-fixtures.sh`).

pub mod common;

use serde_json::{json, Value};

use common::hf::*;
use common::*;

async fn predict(c: &reqwest::Client, s: &Server, model: &str, instances: Value) -> Vec<Value> {
    let r = post_json(
        c,
        &s.url(&format!("/v1/models/{model}/predict")),
        &json!({ "instances": instances }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["predictions"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minilm_embeddings_equal_sentence_transformers_alone_batched_and_over_v2() {
    let s = server("minilm,minilm-pooled", &[]);
    let c = client();
    for model in ["minilm", "minilm-pooled"] {
        let reference = reference(model);
        let items = reference["items"].as_array().unwrap();
        let texts: Vec<Value> = items.iter().map(|i| i["text"].clone()).collect();
        // all at once: one batch of mixed lengths, English and Chinese, one truncated at 256
        let batched = predict(&c, &s, model, Value::Array(texts.clone())).await;
        let mut worst = 0f64;
        for (item, p) in items.iter().zip(&batched) {
            assert_eq!(p["tokens"], item["num_tokens"], "{model}: {}", item["text"]);
            worst = worst.max(max_diff(
                &floats(&p["embedding"]),
                &floats(&item["embedding"]),
            ));
        }
        assert!(
            worst < 1e-5,
            "{model}: batched embeddings differ by {worst}"
        );
        assert!(
            items.iter().any(|i| i["truncated"] == true),
            "the fixture has a text longer than max_length"
        );
        // one at a time equals its place in the batch
        for (item, b) in items.iter().zip(&batched).take(3) {
            let alone = predict(&c, &s, model, json!([item["text"]])).await;
            let d = max_diff(&floats(&alone[0]["embedding"]), &floats(&b["embedding"]));
            assert!(d < 1e-5, "{model}: alone vs batched differ by {d}");
        }
        // v2: BYTES strings in, FP32 embedding [N, 384] out
        let r = post_json(
            &c,
            &s.url(&format!("/v2/models/{model}/infer")),
            &json!({"inputs": [{"name": "text", "shape": [texts.len(), 1], "datatype": "BYTES", "data": texts}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let out = &r.json()["outputs"][0];
        assert_eq!(out["name"], "embedding");
        assert_eq!(out["shape"], json!([items.len(), 384]));
        let expected: Vec<f64> = items.iter().flat_map(|i| floats(&i["embedding"])).collect();
        let d = max_diff(&floats(&out["data"]), &expected);
        assert!(d < 1e-5, "{model}: v2 embeddings differ by {d}");
    }
    // metadata says what v2 takes
    let meta = get(&c, &s.url("/v2/models/minilm")).await.json();
    assert_eq!(meta["inputs"][0]["datatype"], "BYTES");
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 384]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bert_classifier_answers_as_transformers_with_labels_from_config_json() {
    let s = server("bert-classifier", &[]);
    let c = client();
    let reference = reference("bert-classifier");
    let items = reference["items"].as_array().unwrap();
    let texts: Vec<Value> = items.iter().map(|i| i["text"].clone()).collect();
    let batched = predict(&c, &s, "bert-classifier", Value::Array(texts)).await;
    let labels = ["negative", "neutral", "positive"];
    let mut worst = 0f64;
    for (item, p) in items.iter().zip(&batched) {
        let probs: Vec<f64> = labels
            .iter()
            .map(|l| p["scores"][l].as_f64().unwrap())
            .collect();
        worst = worst.max(max_diff(&probs, &floats(&item["probabilities"])));
        assert_eq!(p["label"], item["label"], "{}", item["text"]);
        assert_eq!(p["tokens"], item["num_tokens"], "{}", item["text"]);
    }
    assert!(worst < 1e-5, "probabilities differ by {worst}");
    // one text alone (no padding) equals its place in the padded batch
    let scores = |p: &Value| -> Vec<f64> {
        labels
            .iter()
            .map(|l| p["scores"][l].as_f64().unwrap())
            .collect()
    };
    for (item, b) in items.iter().zip(&batched).take(3) {
        let alone = predict(&c, &s, "bert-classifier", json!([item["text"]])).await;
        let d = max_diff(&scores(&alone[0]), &scores(b));
        assert!(d < 1e-5, "alone vs batched differ by {d}: {}", item["text"]);
    }
    // truncation keeps [SEP]: the long text is cut by the tokenizer to max_length
    let long = items
        .iter()
        .find(|i| i["truncated"] == true)
        .expect("a long text");
    assert_eq!(long["num_tokens"], 32);
    assert_eq!(long["input_ids"].as_array().unwrap().last().unwrap(), 102);
    let alone = predict(&c, &s, "bert-classifier", json!([long["text"]])).await;
    let probs: Vec<f64> = labels
        .iter()
        .map(|l| alone[0]["scores"][l].as_f64().unwrap())
        .collect();
    assert!(max_diff(&probs, &floats(&long["probabilities"])) < 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cross_encoder_scores_pairs_as_transformers_on_v1_and_v2() {
    let s = server("cross-encoder", &["--max-text-bytes", "2000"]);
    let c = client();
    let reference = reference("cross-encoder");
    let items = reference["items"].as_array().unwrap();
    let pairs: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // both spellings of a pair
            if i % 2 == 0 {
                json!({"query": p["query"], "document": p["document"]})
            } else {
                json!({"text": p["query"], "text_pair": p["document"]})
            }
        })
        .collect();
    let batched = predict(&c, &s, "cross-encoder", Value::Array(pairs.clone())).await;
    for (item, p) in items.iter().zip(&batched) {
        let logit = p["logit"].as_f64().unwrap();
        assert!(
            (logit - item["logit"].as_f64().unwrap()).abs() < 1e-5,
            "{p} vs {item}"
        );
        assert!((p["score"].as_f64().unwrap() - item["score"].as_f64().unwrap()).abs() < 1e-5);
        assert_eq!(p["tokens"], item["num_tokens"]);
    }
    // one pair alone (no padding) equals its place in the padded batch
    for (pair, b) in pairs.iter().zip(&batched).take(3) {
        let alone = predict(&c, &s, "cross-encoder", json!([pair])).await;
        let d = (alone[0]["logit"].as_f64().unwrap() - b["logit"].as_f64().unwrap()).abs();
        assert!(d < 1e-5, "alone vs batched differ by {d}: {pair}");
    }
    let queries: Vec<Value> = items.iter().map(|i| i["query"].clone()).collect();
    let documents: Vec<Value> = items.iter().map(|i| i["document"].clone()).collect();
    let n = items.len();
    let r = post_json(
        &c,
        &s.url("/v2/models/cross-encoder/infer"),
        &json!({"inputs": [
            {"name": "query", "shape": [n, 1], "datatype": "BYTES", "data": queries},
            {"name": "document", "shape": [n, 1], "datatype": "BYTES", "data": documents},
        ], "outputs": [{"name": "score"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let out = &r.json()["outputs"][0];
    assert_eq!(out["name"], "score");
    let expected: Vec<f64> = items.iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(max_diff(&floats(&out["data"]), &expected) < 1e-5);

    // bad pairs: each a JSON 4xx naming the problem
    let url = s.url("/v1/models/cross-encoder/predict");
    for (what, instance, status, needle) in [
        (
            "no document",
            json!({"query": "q"}),
            422,
            "document is missing",
        ),
        (
            "no query",
            json!({"document": "d"}),
            422,
            "query is missing",
        ),
        (
            "not a string",
            json!({"query": 1, "document": "d"}),
            422,
            "is a string",
        ),
        ("a bare string", json!("q"), 422, "query"),
        (
            "empty text",
            json!({"query": "", "document": "d"}),
            422,
            "empty",
        ),
        (
            "text over --max-text-bytes",
            json!({"query": "q", "document": "x".repeat(3000)}),
            413,
            "at most 2000",
        ),
    ] {
        let r = post_json(&c, &url, &json!({ "instances": [instance] })).await;
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{what}: {message}");
    }
    let r = post_json(
        &c,
        &s.url("/v2/models/cross-encoder/infer"),
        &json!({"inputs": [
            {"name": "query", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]},
            {"name": "document", "shape": [1, 1], "datatype": "BYTES", "data": ["c"]},
        ]}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_models_refuse_what_they_cannot_tokenise() {
    let s = server("minilm", &["--max-text-bytes", "1000"]);
    let c = client();
    let url = s.url("/v1/models/minilm/predict");
    for (what, instances, status) in [
        ("empty string", json!([""]), 422),
        ("a number", json!([42]), 422),
        ("an object", json!([{"text": "x"}]), 422),
        ("too long", json!(["y".repeat(1001)]), 413),
    ] {
        let r = post_json(&c, &url, &json!({ "instances": instances })).await;
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.error_code().is_empty());
    }
    // invalid UTF-8 in a v2 BYTES element (binary tensor data)
    let header = br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}"#;
    let mut body = header.to_vec();
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&[0xff, 0xfe]);
    let r = send(
        c.post(s.url("/v2/models/minilm/infer"))
            .header("Inference-Header-Content-Length", header.len().to_string())
            .body(body),
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("UTF-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_inputs_come_from_the_torchscript_forward_when_model_toml_names_none() {
    // the classifier fixture with its [[inputs]] removed: the server reads input_ids,
    // attention_mask and token_type_ids from the traced forward (the kind's default would feed
    // input_ids alone, which this model cannot take)
    let repo = TempDir::new("hf-schema");
    let classifier = repo.path().join("bert-classifier");
    copy_dir(&fixtures().join("bert-classifier"), &classifier);
    edit_model_toml(&classifier, |t| {
        t.remove("inputs");
    });
    // torchvision's resnet18 forward takes `x`: as a text model it is refused with the reason
    let vision = repo.path().join("resnet-as-text");
    std::fs::create_dir_all(&vision).unwrap();
    std::fs::copy(
        fixtures().join("resnet18/model.pt"),
        vision.join("model.pt"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("bert-classifier/tokenizer.json"),
        vision.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        vision.join("model.toml"),
        "kind = \"text-embedding\"\n[text]\nmax_length = 16\n[[outputs]]\nname = \"e\"\ndatatype = \"FP32\"\ndims = [1000]\n",
    )
    .unwrap();

    let s = Server::start(
        repo.path(),
        &[
            "--load-model",
            "bert-classifier",
            "--model-control",
            "explicit",
        ],
    );
    s.wait_ready();
    let c = client();
    let reference = reference("bert-classifier");
    let items = reference["items"].as_array().unwrap();
    let texts: Vec<Value> = items.iter().map(|i| i["text"].clone()).collect();
    let batched = predict(&c, &s, "bert-classifier", Value::Array(texts)).await;
    for (item, p) in items.iter().zip(&batched) {
        let probs: Vec<f64> = ["negative", "neutral", "positive"]
            .iter()
            .map(|l| p["scores"][l].as_f64().unwrap())
            .collect();
        let d = max_diff(&probs, &floats(&item["probabilities"]));
        assert!(d < 1e-5, "{}: differs by {d}", item["text"]);
    }
    let meta = get(&c, &s.url("/v1/models/bert-classifier")).await.json();
    let names: Vec<&str> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);

    let r = send(c.post(s.url("/v1/models/resnet-as-text/load"))).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), "load_failed");
    let reason = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        reason.contains("forward takes none of") && reason.contains("\"x\""),
        "{reason}"
    );
    let refused = get(&c, &s.url("/v1/models/resnet-as-text")).await.json();
    assert_eq!(refused["state"], "failed", "{refused}");
}
