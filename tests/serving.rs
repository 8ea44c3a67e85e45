//! Core serving, end to end: the real binary on an ephemeral port, the bundled TorchScript
//! models, real HTTP.

pub mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::future::join_all;
use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Value};

use common::demo::{self, Shape};
use common::*;

fn fresh_rng() -> StdRng {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("shape seed {nanos}");
    StdRng::seed_from_u64(nanos)
}

fn predictions(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["predictions"]
        .as_array()
        .expect("predictions")
        .clone()
}

fn scores(p: &Value) -> Vec<f64> {
    let s = p["scores"].as_object().expect("scores");
    s.values().map(|v| v.as_f64().unwrap()).collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regressor_learned_three_x_plus_noise() {
    let s = Server::bundled();
    let c = client();
    let url = s.url("/v1/models/regressor/predict");
    let r = post_json(&c, &url, &json!({"instances": [[0.5]]})).await;
    let p = predictions(&r);
    let y = p[0].as_f64().unwrap();
    assert!((1.8..=2.2).contains(&y), "f(0.5) = {y}");
    assert_eq!(r.json()["model"], "regressor");
    assert_eq!(r.json()["version"], 1);

    // several instances, bare numbers allowed for a single feature
    let r = post_json(&c, &url, &json!({"instances": [0.0, [1.0], 0.25]})).await;
    let p: Vec<f64> = predictions(&r)
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!((0.3..=0.7).contains(&p[0]), "{p:?}");
    assert!((3.3..=3.7).contains(&p[1]), "{p:?}");
    assert!(p[0] < p[2] && p[2] < p[1], "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_cnn_classifies_freshly_drawn_shapes_as_png_jpeg_base64_and_pixels() {
    let s = Server::bundled();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let mut rng = fresh_rng();
    let per_class = 10;
    let mut total = 0;
    let mut correct = [0usize; 4]; // png, jpeg, b64, pixels
    for shape in Shape::ALL {
        for _ in 0..per_class {
            let img = demo::draw(shape, 64, &mut rng);
            total += 1;
            let png = demo::png(&img);
            let jpeg = demo::jpeg(&img, 90);
            let answers = [
                send(c.post(&url).header("content-type", "image/png").body(png.clone())).await,
                send(c.post(&url).header("content-type", "image/jpeg").body(jpeg)).await,
                post_json(
                    &c,
                    &url,
                    &json!({"instances": [{"b64": base64::engine::general_purpose::STANDARD.encode(&png)}]}),
                )
                .await,
                post_json(
                    &c,
                    &url,
                    &json!({"instances": [img.pixels().flat_map(|p| p.0).collect::<Vec<u8>>()]}),
                )
                .await,
            ];
            for (k, r) in answers.iter().enumerate() {
                let p = &predictions(r)[0];
                let sum: f64 = scores(p).iter().sum();
                assert!((sum - 1.0).abs() < 1e-4, "scores are probabilities: {p}");
                if p["label"] == shape.label() {
                    correct[k] += 1;
                }
            }
        }
    }
    for (k, name) in ["png", "jpeg", "b64", "pixels"].iter().enumerate() {
        let acc = correct[k] as f64 / total as f64;
        eprintln!("{name}: {}/{total}", correct[k]);
        assert!(acc >= 0.9, "{name}: accuracy {acc} on fresh shapes");
    }
    // a large image is resized to the model's 64x64 input
    let big = image::imageops::resize(
        &demo::draw(Shape::Circle, 64, &mut rng),
        256,
        256,
        image::imageops::FilterType::Nearest,
    );
    let r = send(
        c.post(&url)
            .header("content-type", "image/png")
            .body(demo::png(&big)),
    )
    .await;
    assert_eq!(r.status, 200);
    // top_k
    let r = send(
        c.post(format!("{url}?top_k=2"))
            .header("content-type", "image/png")
            .body(demo::png(&demo::draw(Shape::Square, 64, &mut rng))),
    )
    .await;
    let p = &predictions(&r)[0];
    assert_eq!(p["top_k"].as_array().unwrap().len(), 2);
    assert_eq!(p["top_k"][0]["label"], p["label"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_classifier_reads_chinese_and_english() {
    let s = Server::bundled();
    let c = client();
    let url = s.url("/v1/models/text-classifier/predict");
    let cases = [
        ("I love this wonderful movie", "positive"),
        ("What a great and happy day", "positive"),
        ("我爱你", "positive"),
        ("今天很开心，谢谢你", "positive"),
        ("This is terrible and I hate it", "negative"),
        ("The service was awful and rude", "negative"),
        ("太糟糕了，我很失望", "negative"),
        ("我讨厌这个，真让人生气", "negative"),
    ];
    let instances: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let r = post_json(&c, &url, &json!({"instances": instances})).await;
    let p = predictions(&r);
    assert_eq!(p.len(), cases.len(), "one prediction per instance: {p:?}");
    for ((text, want), got) in cases.iter().zip(&p) {
        assert_eq!(got["label"], *want, "{text}: {got}");
    }
    // unknown words and over-long text are fine: unknown tokens, truncation
    let long = "good ".repeat(500);
    let r = post_json(&c, &url, &json!({"instances": ["zxqv blorp", long]})).await;
    assert_eq!(predictions(&r).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_json_error_and_the_server_keeps_serving() {
    let s = Server::start(&models_dir(), &["--max-body-bytes", "200000"]);
    s.wait_ready();
    let c = client();
    let img = s.url("/v1/models/image-cnn/predict");
    let reg = s.url("/v1/models/regressor/predict");
    let text = s.url("/v1/models/text-classifier/predict");
    let typed = |url: &str, content_type: &str, body: Vec<u8>| {
        c.post(url).header("content-type", content_type).body(body)
    };
    let with_timeout = |ms: &str| {
        c.post(&reg)
            .header("x-request-timeout-ms", ms)
            .json(&json!({"instances": [1]}))
    };
    let one = json!({"instances": [1]});
    // (what is wrong, answer, status, code)
    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        (
            "unknown model",
            post_json(&c, &s.url("/v1/models/nope/predict"), &one).await,
            404,
            "model_not_found",
        ),
        (
            "unknown version",
            post_json(&c, &s.url("/v1/models/regressor/versions/7/predict"), &one).await,
            404,
            "model_not_found",
        ),
        (
            "truncated JSON",
            send(typed(
                &reg,
                "application/json",
                b"{\"instances\": [1,".to_vec(),
            ))
            .await,
            400,
            "malformed_body",
        ),
        (
            "not JSON",
            send(typed(&reg, "application/json", b"not json".to_vec())).await,
            400,
            "malformed_body",
        ),
        (
            "empty instances",
            post_json(&c, &reg, &json!({"instances": []})).await,
            422,
            "invalid_input",
        ),
        (
            "no instances key",
            post_json(&c, &reg, &json!({"inputs": [1]})).await,
            422,
            "invalid_input",
        ),
        (
            "regressor instance of the wrong width",
            post_json(&c, &reg, &json!({"instances": [[1, 2]]})).await,
            422,
            "invalid_input",
        ),
        (
            "string for the regressor",
            post_json(&c, &reg, &json!({"instances": ["one"]})).await,
            422,
            "invalid_input",
        ),
        (
            "image pixels of the wrong shape",
            post_json(&c, &img, &json!({"instances": [[1, 2, 3]]})).await,
            422,
            "invalid_input",
        ),
        (
            "bad base64",
            post_json(&c, &img, &json!({"instances": [{"b64": "!!!"}]})).await,
            400,
            "malformed_body",
        ),
        (
            "base64 of no image",
            post_json(&c, &img, &json!({"instances": [{"b64": "aGVsbG8="}]})).await,
            400,
            "malformed_body",
        ),
        (
            "corrupt PNG",
            send(typed(
                &img,
                "image/png",
                b"\x89PNG\r\n\x1a\n garbage".to_vec(),
            ))
            .await,
            400,
            "malformed_body",
        ),
        (
            "text/plain body",
            send(typed(&img, "text/plain", b"hello".to_vec())).await,
            415,
            "unsupported_media_type",
        ),
        (
            "form body that is not JSON",
            send(typed(
                &reg,
                "application/x-www-form-urlencoded",
                b"instances=1".to_vec(),
            ))
            .await,
            415,
            "unsupported_media_type",
        ),
        (
            "image for a non-image model",
            send(typed(&reg, "image/png", vec![0u8; 10])).await,
            415,
            "unsupported_media_type",
        ),
        (
            "image body above --max-body-bytes",
            send(typed(&img, "image/png", vec![0u8; 300_000])).await,
            413,
            "payload_too_large",
        ),
        (
            "empty text",
            post_json(&c, &text, &json!({"instances": [""]})).await,
            422,
            "invalid_input",
        ),
        (
            "number for the text classifier",
            post_json(&c, &text, &json!({"instances": [42]})).await,
            422,
            "invalid_input",
        ),
        (
            "top_k not a number",
            send(c.post(format!("{reg}?top_k=x")).json(&one)).await,
            422,
            "invalid_input",
        ),
        (
            "x-request-timeout-ms not a number",
            send(with_timeout("soon")).await,
            400,
            "bad_request",
        ),
        (
            "x-request-timeout-ms zero",
            send(with_timeout("0")).await,
            400,
            "bad_request",
        ),
        (
            "x-request-timeout-ms negative",
            send(with_timeout("-5")).await,
            400,
            "bad_request",
        ),
        (
            "wrong method",
            send(c.get(&reg)).await,
            405,
            "method_not_allowed",
        ),
        (
            "unknown route",
            send(c.get(s.url("/no/such/route"))).await,
            404,
            "not_found",
        ),
    ];
    for (what, r, status, code) in &cases {
        assert_eq!(
            r.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.error_code(), *code, "{what}");
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json"),
            "{what}"
        );
    }
    // still serving
    let r = post_json(&c, &reg, &json!({"instances": [[0.5]]})).await;
    assert_eq!(r.status, 200);
    assert!(s.log_text().contains("listening on"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_form_bodies_that_are_json_are_taken_as_json() {
    // curl -d sends application/x-www-form-urlencoded; TF Serving and TorchServe read it as JSON
    let s = Server::bundled();
    let c = client();
    let form = |model: &str, body: &str| {
        c.post(s.url(&format!("/v1/models/{model}/predict")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string())
    };
    let as_form = send(form("regressor", r#"{"instances": [[0.5]]}"#)).await;
    let as_json = post_json(
        &c,
        &s.url("/v1/models/regressor/predict"),
        &json!({"instances": [[0.5]]}),
    )
    .await;
    assert_eq!(
        as_form.status,
        200,
        "{}",
        String::from_utf8_lossy(&as_form.body)
    );
    assert_eq!(as_form.json()["predictions"], as_json.json()["predictions"]);
    let text = send(form("text-classifier", r#"{"instances": ["我爱你"]}"#)).await;
    assert_eq!(text.status, 200, "{}", String::from_utf8_lossy(&text.body));
    assert_eq!(text.json()["predictions"][0]["label"], "positive");
    // well-formed JSON of the wrong shape is still 422, as for application/json
    let shape = send(form("regressor", r#"{"instances": []}"#)).await;
    assert_eq!(
        (shape.status, shape.error_code().as_str()),
        (422, "invalid_input")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503_with_retry_after_at_once() {
    let repo = slow_image_repo();
    edit_model_toml(&repo.path().join("image-cnn"), |t| {
        t["batching"]["queue_capacity"] = 1.into();
    });
    let s = Server::start(repo.path(), &[]);
    s.wait_ready();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let body = demo::png(&demo::draw(Shape::Circle, 64, &mut fresh_rng()));
    let replies = join_all((0..64).map(|_| {
        send(
            c.post(&url)
                .header("content-type", "image/png")
                .body(body.clone()),
        )
    }))
    .await;
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok + refused.len(), 64, "only 200 or 503 expected");
    assert!(
        !refused.is_empty(),
        "a queue of 1 never filled under 64 concurrent requests"
    );
    assert!(ok >= 1);
    for r in refused {
        assert_eq!(r.error_code(), "overloaded");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    let r = send(c.post(&url).header("content-type", "image/png").body(body)).await;
    assert_eq!(r.status, 200, "serves again once the queue drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_forward_passes_and_get_their_own_results() {
    let s = Server::bundled();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let mut rng = fresh_rng();
    let images: Vec<Vec<u8>> = (0..64)
        .map(|i| demo::png(&demo::draw(Shape::ALL[i % 3], 64, &mut rng)))
        .collect();
    // alone, one at a time: batch size 1
    let mut alone = Vec::new();
    for img in &images[..16] {
        let r = send(
            c.post(&url)
                .header("content-type", "image/png")
                .body(img.clone()),
        )
        .await;
        assert_eq!(r.header("x-batch-size"), Some("1"));
        alone.push(scores(&predictions(&r)[0]));
    }
    let executions_before = metric(&s, "aiaas_executions_total", "image-cnn").await;
    let replies = join_all(images.iter().map(|img| {
        send(
            c.post(&url)
                .header("content-type", "image/png")
                .body(img.clone()),
        )
    }))
    .await;
    let sizes: Vec<usize> = replies
        .iter()
        .map(|r| r.header("x-batch-size").unwrap().parse().unwrap())
        .collect();
    let passes: f64 = sizes.iter().map(|&b| 1.0 / b as f64).sum();
    let executions = metric(&s, "aiaas_executions_total", "image-cnn").await - executions_before;
    eprintln!("64 requests in {executions} forward passes; batch sizes {sizes:?}");
    assert!(
        executions < 64.0,
        "no batching: {executions} forward passes"
    );
    assert!(
        (passes - executions).abs() < 0.01,
        "x-batch-size disagrees with the metrics"
    );
    assert!(
        sizes.iter().all(|&b| b <= 32),
        "max_batch_size exceeded: {sizes:?}"
    );
    for (i, r) in replies.iter().take(16).enumerate() {
        assert_close(&scores(&predictions(r)[0]), &alone[i], 1e-5);
    }
    for r in &replies {
        for h in ["x-request-id", "x-queue-time-ms", "x-inference-time-ms"] {
            assert!(r.header(h).is_some(), "missing {h}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn padded_text_batches_equal_single_results() {
    let s = Server::bundled();
    let c = client();
    let url = s.url("/v1/models/text-classifier/predict");
    let texts = [
        "好",
        "I love it",
        "The food was cold and the waiter was very rude to us",
        "我们将一起前进",
    ];
    let mut alone = Vec::new();
    for t in texts {
        let r = post_json(&c, &url, &json!({"instances": [t]})).await;
        alone.push(scores(&predictions(&r)[0]));
    }
    let r = post_json(&c, &url, &json!({"instances": texts})).await;
    assert_eq!(
        r.header("x-batch-size"),
        Some("4"),
        "one request's instances share a pass"
    );
    let batched = predictions(&r);
    assert_eq!(batched.len(), alone.len(), "one prediction per instance");
    for (p, a) in batched.iter().zip(&alone) {
        assert_close(&scores(p), a, 1e-5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_models_fail_alone_with_their_reason() {
    let repo = temp_repository(&["regressor"]);
    let root = repo.path();
    // a model.toml that does not parse
    std::fs::create_dir_all(root.join("bad-toml")).unwrap();
    std::fs::write(root.join("bad-toml/model.toml"), "kind = [oops").unwrap();
    // a corrupt TorchScript file
    copy_dir(&models_dir().join("regressor"), &root.join("corrupt"));
    std::fs::write(root.join("corrupt/model.pt"), b"this is not a zip archive").unwrap();
    // a missing TorchScript file
    copy_dir(&models_dir().join("regressor"), &root.join("missing"));
    std::fs::remove_file(root.join("missing/model.pt")).unwrap();

    let s = Server::start(root, &[]);
    let c = client();
    let mut ready = None;
    for _ in 0..300 {
        let r = post_json(
            &c,
            &s.url("/v1/models/regressor/predict"),
            &json!({"instances": [0.5]}),
        )
        .await;
        if r.status == 200 {
            ready = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        ready.is_some(),
        "the good model never served: {}",
        s.log_text()
    );
    for (name, needle) in [
        ("bad-toml", "model.toml"),
        ("corrupt", "model.pt"),
        ("missing", "file not found"),
    ] {
        let mut last = None;
        for _ in 0..100 {
            let r = post_json(
                &c,
                &s.url(&format!("/v1/models/{name}/predict")),
                &json!({"instances": [0.5]}),
            )
            .await;
            let msg = r.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if msg.contains("failed") {
                last = Some((r.status, msg));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let (status, msg) = last.unwrap_or_else(|| panic!("{name} never failed: {}", s.log_text()));
        assert_eq!(status, 503, "{name}: {msg}");
        assert!(
            msg.contains(needle),
            "{name}: reason should name {needle}: {msg}"
        );
    }
    // strict readiness: the failed models keep the server out of rotation, and say why
    let (status, body) = blocking_get(&s.url("/health/ready")).unwrap();
    assert_eq!(status, 503);
    assert!(
        body.contains("corrupt") && body.contains("failed"),
        "{body}"
    );
    assert!(s.wait_log("model failed to load"), "{}", s.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_probes_and_request_ids() {
    let s = Server::bundled();
    let c = client();
    let r = get(&c, &s.url("/health/live")).await;
    assert_eq!(r.status, 200);
    let r = get(&c, &s.url("/health/ready")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");

    let r = send(
        c.post(s.url("/v1/models/regressor/predict"))
            .header("x-request-id", "trace-me-42")
            .json(&json!({"instances": [1.0]})),
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("trace-me-42"));
    let r = post_json(
        &c,
        &s.url("/v1/models/regressor/predict"),
        &json!({"instances": [1.0]}),
    )
    .await;
    let id = r.header("x-request-id").unwrap().to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 4),
        "{id}"
    );
    // the later request's line: both are in by then
    assert!(s.wait_log(&id), "{}", s.log_text());
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("trace-me-42"))
        .unwrap_or_else(|| panic!("request id not logged:\n{log}"));
    assert!(line.contains("regressor") && line.contains("200"), "{line}");
    // one start-up line per model with load and warm-up times
    for m in ["regressor", "text-classifier", "image-cnn"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("model ready: {m} v1")) && l.contains("warm-up")),
            "{m}: {log}"
        );
    }
}

/// Sum of a per-model counter in /metrics.
async fn metric(s: &Server, name: &str, model: &str) -> f64 {
    let text = get(&client(), &s.url("/metrics")).await.body;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("model=\"{model}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_bodies_answer_alike_whichever_parser_reads_them() {
    // `{"instances": [numbers]}` exactly takes the fast scanner; any other key order or extra
    // key takes serde: the answers must not depend on which one read the body
    let s = Server::start(&models_dir(), &["--interop-threads", "3"]);
    s.wait_ready();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let img = demo::draw(Shape::Square, 64, &mut fresh_rng());
    let rows: Vec<Vec<[u8; 3]>> = (0..64)
        .map(|y| (0..64).map(|x| img.get_pixel(x, y).0).collect())
        .collect();
    let fast = post_json(&c, &url, &json!({"instances": [rows]})).await;
    let slow = send(
        c.post(&url)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"parameters": {{"top_k": 3}}, "instances": [{}]}}"#,
                serde_json::to_string(&rows).unwrap()
            )),
    )
    .await;
    let (fast, slow) = (&predictions(&fast)[0], &predictions(&slow)[0]);
    // (the label itself is checked by the accuracy tests: one fresh image may be misread)
    assert_eq!(fast["label"], slow["label"], "{fast} vs {slow}");
    assert_close(&scores(fast), &scores(slow), 0.0);

    // the regressor: bare numbers and one-element rows, integers and decimals
    let reg = s.url("/v1/models/regressor/predict");
    let r = post_json(&c, &reg, &json!({"instances": [0.5, [0.5], 5e-1]})).await;
    let p = predictions(&r);
    assert_eq!(p.len(), 3);
    assert!(p.iter().all(|v| v == &p[0]), "{p:?}");

    // what neither path takes is refused with serde's message and the right status
    for (body, status, needle) in [
        (r#"{"instances": [[[1, 2], [3]]]}"#, 422, "rectangular"),
        (r#"{"instances": [1, 2,]}"#, 400, "invalid JSON"),
        (r#"{"instances": [1e400]}"#, 400, "number out of range"),
        (r#"{"instances": [1], "extra": 0}"#, 422, "unknown field"),
    ] {
        let r = send(
            c.post(&reg)
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(
            r.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(msg.contains(needle), "{body}: {msg}");
    }

    // --interop-threads sized libtorch's process-wide pool before any model loaded
    assert!(
        s.log_text().contains("interop_threads=3"),
        "{}",
        s.log_text()
    );
}

/// One of the server's threads, as /proc shows it.
#[derive(Debug, Clone, PartialEq)]
struct ThreadInfo {
    state: char,
    /// Scheduling policy (5: SCHED_IDLE).
    policy: u32,
    /// User plus system CPU time, in clock ticks.
    cpu_ticks: u64,
    /// Times it blocked (a poller blocks only when it goes to sleep).
    voluntary_switches: u64,
}

/// The server's threads whose name starts with `prefix`, by thread id.
fn threads_named(pid: u32, prefix: &str) -> Vec<(String, ThreadInfo)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
        // fields after the parenthesised name: state is field 3, utime 14, stime 15, policy 41
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        let field = |n: usize| rest[n - 3];
        let status = std::fs::read_to_string(dir.join("status")).expect("status");
        let voluntary = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .expect("voluntary_ctxt_switches")
            .trim()
            .parse()
            .expect("count");
        out.push((
            dir.file_name().unwrap().to_string_lossy().into_owned(),
            ThreadInfo {
                state: field(3).chars().next().unwrap(),
                policy: field(41).parse().unwrap(),
                cpu_ticks: field(14).parse::<u64>().unwrap() + field(15).parse::<u64>().unwrap(),
                voluntary_switches: voluntary,
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Waits (up to 20 s: a SCHED_IDLE thread on a busy machine runs rarely) until every thread
/// named `prefix...` sleeps and, when `after` is given, has slept again since then (all of
/// them, or with `any`, at least one: an engine instance may have had no work).
fn wait_asleep(
    pid: u32,
    prefix: &str,
    after: Option<&[(String, ThreadInfo)]>,
    any: bool,
) -> Vec<(String, ThreadInfo)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = threads_named(pid, prefix);
        let asleep = now.iter().all(|(_, t)| t.state == 'S');
        let slept_again = after.is_none_or(|before| {
            assert_eq!(
                before.len(),
                now.len(),
                "{prefix}: threads came or went: {now:?}"
            );
            let mut again = before
                .iter()
                .zip(&now)
                .map(|((a, b), (c, d))| a == c && d.voluntary_switches > b.voluntary_switches);
            if any {
                again.any(|x| x)
            } else {
                again.all(|x| x)
            }
        });
        if asleep && slept_again {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "{prefix}: {now:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_polling_runs_at_the_lowest_priority_and_sleeps_when_idle() {
    let s = Server::start(
        &models_dir(),
        &["--idle-poll-us", "2000", "--load-model", "regressor"],
    );
    s.wait_ready();
    assert!(s.wait_log("idle polling on"), "{}", s.log_text());
    let cpus = std::thread::available_parallelism().unwrap().get();
    let pollers = threads_named(s.pid(), "idle-poll");
    assert_eq!(pollers.len(), cpus, "one poller per CPU: {pollers:?}");
    assert!(
        pollers.iter().all(|(_, t)| t.policy == 5),
        "SCHED_IDLE: {pollers:?}"
    );

    // idle: the pollers, and the model's queue and engine threads (which poll for work too),
    // sleep and burn nothing
    let idle = wait_asleep(s.pid(), "idle-poll", None, false);
    let model_threads = [
        wait_asleep(s.pid(), "engine-", None, false),
        wait_asleep(s.pid(), "batch-queue", None, false),
    ];
    assert!(model_threads.iter().all(|t| !t.is_empty()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        threads_named(s.pid(), "idle-poll"),
        idle,
        "an idle server's pollers must not run"
    );
    assert_eq!(
        [
            threads_named(s.pid(), "engine-"),
            threads_named(s.pid(), "batch-queue")
        ],
        model_threads,
        "an idle model's threads must not run"
    );

    // requests wake them; after the window they sleep again; answers are unchanged
    let c = client();
    let url = s.url("/v1/models/regressor/predict");
    for _ in 0..20 {
        let r = post_json(&c, &url, &json!({"instances": [0.5]})).await;
        let y = predictions(&r)[0].as_f64().expect("number");
        assert!((y - 1.5).abs() < 1.0, "f(0.5) = {y}");
    }
    wait_asleep(s.pid(), "idle-poll", Some(&idle), false);
    wait_asleep(s.pid(), "engine-", Some(&model_threads[0]), true);
    wait_asleep(s.pid(), "batch-queue", Some(&model_threads[1]), false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idle_polling_there_are_no_pollers() {
    let s = Server::start(&models_dir(), &["--load-model", "regressor"]);
    s.wait_ready();
    assert!(threads_named(s.pid(), "idle-poll").is_empty());
    assert!(!s.log_text().contains("idle polling"), "{}", s.log_text());
}
