//! The APIs embedding and rerank clients speak (OpenAI's `/v1/embeddings`, Cohere-style
//! `/v1/rerank`) and the token-budget batching behind them, on the Hugging Face fixtures (real
//! all-MiniLM-L6-v2 weights; a random cross-encoder), against the reference answers and the
//! server's own /v1 predict. The `openai` Python package's view is in
//! tests/python/test_openai.py.

pub mod common;

use base64::Engine as _;
use serde_json::{json, Value};

use common::hf::*;
use common::*;

async fn embeddings(c: &reqwest::Client, s: &Server, body: Value) -> Reply {
    post_json(c, &s.url("/v1/embeddings"), &body).await
}

/// The vectors of an OpenAI answer, in `index` order.
fn vectors(answer: &Value) -> Vec<Vec<f64>> {
    let data = answer["data"].as_array().expect("data");
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i, "{d}");
        assert_eq!(d["object"], "embedding");
    }
    data.iter().map(|d| floats(&d["embedding"])).collect()
}

/// Asserts an OpenAI-shaped error: status, `code`, `param`, a message and a `type`.
fn openai_error(r: &Reply, status: u16, code: &str, param: Option<&str>) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], code, "{e}");
    assert_eq!(e["param"], param.map_or(Value::Null, |p| json!(p)), "{e}");
    assert!(
        e["type"].as_str().is_some_and(|t| t.ends_with("_error")),
        "{e}"
    );
    e["message"].as_str().expect("message").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_embeddings_equal_sentence_transformers_and_v1_predict() {
    let s = server("minilm,bert-classifier", &[]);
    let c = client();
    let reference = reference("minilm");
    let items = reference["items"].as_array().unwrap();
    let texts: Vec<Value> = items.iter().map(|i| i["text"].clone()).collect();
    let expected: Vec<Vec<f64>> = items.iter().map(|i| floats(&i["embedding"])).collect();

    // many texts, floats: sentence-transformers' vectors, in order, with OpenAI's envelope
    let r = embeddings(&c, &s, json!({"model": "minilm", "input": texts})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], "minilm");
    let got = vectors(&answer);
    assert_eq!(got.len(), items.len());
    for (g, e) in got.iter().zip(&expected) {
        assert!(max_diff(g, e) < 1e-5);
    }
    let tokens: u64 = items
        .iter()
        .map(|i| i["num_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);
    assert_eq!(answer["usage"]["total_tokens"], tokens);

    // the same vectors as /v1 predict
    let r = post_json(
        &c,
        &s.url("/v1/models/minilm/predict"),
        &json!({"instances": texts}),
    )
    .await;
    let predicted = r.json()["predictions"].as_array().unwrap().clone();
    for (g, p) in got.iter().zip(&predicted) {
        assert!(max_diff(g, &floats(&p["embedding"])) < 1e-6);
    }

    // one string; base64 of little-endian FP32 decodes to the same floats
    let r = embeddings(
        &c,
        &s,
        json!({"model": "minilm", "input": items[0]["text"], "encoding_format": "base64", "user": "u-1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b64 = r.json()["data"][0]["embedding"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let decoded: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(decoded.len(), 384);
    // the same request as floats: the same numbers (a vector computed alone, padded to its own
    // bucket, may differ from the one computed in the batch above in the last bits)
    let r = embeddings(
        &c,
        &s,
        json!({"model": "minilm", "input": items[0]["text"]}),
    )
    .await;
    assert!(max_diff(&decoded, &vectors(&r.json())[0]) < 1e-7);
    assert!(max_diff(&decoded, &got[0]) < 1e-5);

    // token ids, one list and a list of lists: the vectors of the texts they came from
    let ids: Vec<Value> = items.iter().map(|i| i["input_ids"].clone()).collect();
    let r = embeddings(&c, &s, json!({"model": "minilm", "input": ids[1]})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(max_diff(&vectors(&r.json())[0], &expected[1]) < 1e-5);
    let r = embeddings(&c, &s, json!({"model": "minilm", "input": ids[..3]})).await;
    for (g, e) in vectors(&r.json()).iter().zip(&expected) {
        assert!(max_diff(g, e) < 1e-5);
    }

    // dimensions: the first n, re-normalised (the model's vectors are unit length)
    let r = embeddings(
        &c,
        &s,
        json!({"model": "minilm", "input": items[2]["text"], "dimensions": 64}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let short = &vectors(&r.json())[0];
    assert_eq!(short.len(), 64);
    let norm = short.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    let head = &expected[2][..64];
    let head_norm = head.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scaled: Vec<f64> = head.iter().map(|x| x / head_norm).collect();
    assert!(max_diff(short, &scaled) < 1e-5);

    // errors: OpenAI's shape, the API's statuses
    let unknown = embeddings(&c, &s, json!({"model": "nope", "input": "x"})).await;
    openai_error(&unknown, 404, "model_not_found", Some("model"));
    let wrong_kind = embeddings(&c, &s, json!({"model": "bert-classifier", "input": "x"})).await;
    let m = openai_error(&wrong_kind, 400, "bad_request", Some("model"));
    assert!(m.contains("text-classifier"), "{m}");
    for dims in [json!(0), json!(385), json!(-3), json!("8"), json!(1.5)] {
        let r = embeddings(
            &c,
            &s,
            json!({"model": "minilm", "input": "x", "dimensions": dims}),
        )
        .await;
        let m = openai_error(&r, 422, "invalid_input", Some("dimensions"));
        assert!(m.contains("384"), "{m}");
    }
    let r = embeddings(
        &c,
        &s,
        json!({"model": "minilm", "input": "x", "encoding_format": "int8"}),
    )
    .await;
    openai_error(&r, 422, "invalid_input", Some("encoding_format"));
    for (input, needle) in [
        (json!([]), "empty"),
        (json!(""), "empty"),
        (json!(["ok", ""]), "input 1"),
        (json!({"text": "x"}), "an object"),
        (json!([1, 2.5]), "whole numbers"),
        (json!([101, 999_999_999]), "vocabulary"),
        (json!(vec![101; 300]), "at most 256"),
    ] {
        let r = embeddings(&c, &s, json!({"model": "minilm", "input": input})).await;
        let m = openai_error(&r, 422, "invalid_input", Some("input"));
        assert!(m.contains(needle), "{input}: {m}");
    }
    let r = send(
        c.post(s.url("/v1/embeddings"))
            .header("content-type", "application/json")
            .body("{\"model\": \"minilm\", \"input\""),
    )
    .await;
    openai_error(&r, 400, "malformed_body", None);
    let r = embeddings(&c, &s, json!({"input": "x"})).await;
    let m = openai_error(&r, 422, "invalid_input", None);
    assert!(m.contains("model"), "{m}");
    let r = send(c.get(s.url("/v1/embeddings"))).await;
    openai_error(&r, 405, "method_not_allowed", None);
    // the API's own routes keep their shape
    let r = post_json(
        &c,
        &s.url("/v1/models/nope/predict"),
        &json!({"instances": []}),
    )
    .await;
    assert!(r.json()["error"].get("type").is_none(), "{}", r.text());

    // GET /v1/models answers OpenAI's list shape beside its own
    let list = get(&c, &s.url("/v1/models")).await.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            assert!(m["created"].is_u64() && m["owned_by"].is_string());
            m["id"].as_str().unwrap()
        })
        .collect();
    assert!(ids.contains(&"minilm") && ids.contains(&"bert-classifier"));
    assert!(list["models"].as_array().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rerank_orders_documents_by_the_cross_encoders_scores() {
    let s = server("cross-encoder,minilm", &[]);
    let c = client();
    let reference = reference("cross-encoder");
    let items = reference["items"].as_array().unwrap();
    let query = items[0]["query"].as_str().unwrap().to_string();
    let documents: Vec<String> = items
        .iter()
        .map(|i| i["document"].as_str().unwrap().to_string())
        .collect();
    // each pair's score from /v1 predict
    let pairs: Vec<Value> = documents
        .iter()
        .map(|d| json!({"query": query, "document": d}))
        .collect();
    let r = post_json(
        &c,
        &s.url("/v1/models/cross-encoder/predict"),
        &json!({ "instances": pairs }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let scores: Vec<f64> = r.json()["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["score"].as_f64().unwrap())
        .collect();
    let tokens: u64 = r.json()["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["tokens"].as_u64().unwrap())
        .sum();

    let r = post_json(
        &c,
        &s.url("/v1/rerank"),
        &json!({"model": "cross-encoder", "query": query, "documents": documents}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(answer["model"], "cross-encoder");
    assert_eq!(answer["id"].as_str(), r.header("x-request-id"));
    assert_eq!(answer["usage"]["total_tokens"], tokens);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), documents.len());
    let mut seen = vec![false; documents.len()];
    let mut last = f64::INFINITY;
    for res in results {
        let i = res["index"].as_u64().unwrap() as usize;
        let score = res["relevance_score"].as_f64().unwrap();
        assert!((score - scores[i]).abs() < 1e-6, "{res} vs {}", scores[i]);
        assert!(score <= last, "not best first: {answer}");
        assert!(res.get("document").is_none());
        last = score;
        seen[i] = true;
    }
    assert!(seen.iter().all(|&s| s));

    // top_n, documents returned, and Cohere's older {"text"} documents
    let objects: Vec<Value> = documents.iter().map(|d| json!({"text": d})).collect();
    let r = post_json(
        &c,
        &s.url("/v1/rerank"),
        &json!({"model": "cross-encoder", "query": query, "documents": objects, "top_n": 2, "return_documents": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let top = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["index"], results[0]["index"]);
    assert_eq!(top[1]["index"], results[1]["index"]);
    let i = top[0]["index"].as_u64().unwrap() as usize;
    assert_eq!(top[0]["document"]["text"], documents[i]);

    // errors: the API's own shape
    let url = s.url("/v1/rerank");
    for (body, status, code) in [
        (
            json!({"model": "nope", "query": "q", "documents": ["d"]}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "minilm", "query": "q", "documents": ["d"]}),
            400,
            "bad_request",
        ),
        (
            json!({"model": "cross-encoder", "query": "q", "documents": []}),
            422,
            "invalid_input",
        ),
        (
            json!({"model": "cross-encoder", "query": "q", "documents": ["d"], "top_n": 0}),
            422,
            "invalid_input",
        ),
        (
            json!({"model": "cross-encoder", "query": "", "documents": ["d"]}),
            422,
            "invalid_input",
        ),
        (
            json!({"model": "cross-encoder", "query": "q", "documents": [3]}),
            422,
            "invalid_input",
        ),
        (
            json!({"model": "cross-encoder", "documents": ["d"]}),
            422,
            "invalid_input",
        ),
    ] {
        let r = post_json(&c, &url, &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert_eq!(r.error_code(), code, "{body}");
    }
}

/// A copy of the MiniLM fixture whose `[batching]` is replaced by `batching`.
fn minilm_with(batching: &str) -> TempDir {
    let dir = TempDir::new("aiaas-tokens-");
    let from = fixtures().join("minilm");
    let to = dir.path().join("minilm");
    copy_dir(&from, &to);
    let toml = std::fs::read_to_string(to.join("model.toml")).unwrap();
    std::fs::write(
        to.join("model.toml"),
        format!("{toml}\n[batching]\n{batching}\n"),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_budget_bounds_every_batch_and_padding_is_measured() {
    // texts of at most 16 tokens pad to 16; a budget of 32 tokens lets two through at a time
    let repo = minilm_with("max_batch_tokens = 32\nsequence_buckets = [16, 64]");
    let s = Server::start(repo.path(), &["--load-model", "minilm"]);
    s.wait_ready();
    let c = client();
    let texts = [
        "short",
        "a somewhat longer sentence here",
        "猫在睡觉",
        "hello there",
    ];
    let mut tasks = Vec::new();
    for k in 0..24 {
        let (c, url) = (c.clone(), s.url("/v1/embeddings"));
        let text = texts[k % texts.len()];
        tasks.push(tokio::spawn(async move {
            post_json(&c, &url, &json!({"model": "minilm", "input": text})).await
        }));
    }
    let mut largest = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let rows: usize = r.header("x-batch-size").unwrap().parse().unwrap();
        largest = largest.max(rows);
    }
    assert!(
        largest <= 2,
        "a batch of {largest} rows of 16 tokens passed a budget of 32"
    );
    // a text over the budget (64 padded tokens) still runs, alone
    let long = "word ".repeat(40);
    let r = embeddings(&c, &s, json!({"model": "minilm", "input": long})).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // the model's description shows the settings and the padding measured
    let m = get(&c, &s.url("/v1/models/minilm")).await.json();
    assert_eq!(m["batching"]["max_batch_tokens"], 32);
    assert_eq!(m["batching"]["sequence_buckets"], json!([16, 64, 256]));
    assert_eq!(m["batching"]["group_by_length"], true);
    let stats = &m["versions"][0]["stats"];
    let (real, padded) = (
        stats["real_tokens"].as_u64().unwrap(),
        stats["padded_tokens"].as_u64().unwrap(),
    );
    assert!(real > 0 && padded >= real, "{stats}");
    // every text here pads to 16 (the long one to 64)
    assert!(padded % 16 == 0, "{stats}");
    let waste = stats["padding_waste"].as_f64().unwrap();
    assert!((waste - padded as f64 / real as f64).abs() < 1e-9);

    // and Prometheus sees the same tokens, and the budget in the histogram
    let metrics = get(&c, &s.url("/metrics")).await.text();
    let value = |needle: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in /metrics"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let l = "model=\"minilm\",version=\"1\"";
    assert_eq!(
        value(&format!("aiaas_tokens_total{{kind=\"real\",{l}}}")),
        real as f64
    );
    assert_eq!(
        value(&format!("aiaas_tokens_total{{kind=\"padded\",{l}}}")),
        padded as f64
    );
    let passes = value(&format!("aiaas_batch_tokens_count{{{l}}}"));
    let within = value(&format!("aiaas_batch_tokens_bucket{{{l},le=\"64\"}}"));
    assert_eq!(passes, within, "every pass within 64 padded tokens");
    let within_budget = value(&format!("aiaas_batch_tokens_bucket{{{l},le=\"16\"}}"));
    assert!(
        passes > within_budget,
        "some passes carried two texts: {metrics}"
    );
}

/// Waits for `model`'s load to fail and returns its reason.
async fn failure_reason(c: &reqwest::Client, s: &Server, model: &str) -> String {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while std::time::Instant::now() < until {
        if let Ok(r) = c.get(s.url(&format!("/v1/models/{model}"))).send().await {
            let v: Value = r.json().await.unwrap_or_default();
            if v["state"] == "failed" {
                return v["reason"].as_str().unwrap_or_default().to_string();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{model} did not fail to load: {}", s.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_batching_settings_are_checked() {
    let c = client();
    let repo = minilm_with("sequence_buckets = [32, 16]");
    let s = Server::start(repo.path(), &["--load-model", "minilm"]);
    let reason = failure_reason(&c, &s, "minilm").await;
    assert!(
        reason.contains("sequence_buckets must be positive and ascending"),
        "{reason}"
    );
    // the token settings are for text models only
    let repo = temp_repository(&["regressor"]);
    edit_model_toml(&repo.path().join("regressor"), |t| {
        t.entry("batching")
            .or_insert(toml::Value::Table(Default::default()))
            .as_table_mut()
            .unwrap()
            .insert("max_batch_tokens".into(), toml::Value::Integer(64));
    });
    let s = Server::start(repo.path(), &["--load-model", "regressor"]);
    let reason = failure_reason(&c, &s, "regressor").await;
    assert!(reason.contains("apply to text models"), "{reason}");
}
