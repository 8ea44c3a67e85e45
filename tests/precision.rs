//! Reduced precision on the CPU, against full precision: the demo CNN and the real
//! all-MiniLM-L6-v2 served with `precision = "bf16"` answer within the tolerance docs/GPU.md states
//! of the same models in fp32 (and of sentence-transformers' own embeddings); `fp16` on the CPU
//! is refused at load with its reason, the other models serving; and without a GPU there are
//! no GPU memory gauges.

pub mod common;

use serde_json::{json, Value};

use common::hf::*;
use common::*;

/// docs/GPU.md's stated tolerances for bf16 against fp32 (its precision table).
const BF16_SCORE_TOLERANCE: f64 = 0.02;
const BF16_EMBEDDING_MIN_COSINE: f64 = 0.999;
const BF16_EMBEDDING_TOLERANCE: f64 = 0.02;

/// The demo CNN at fp32, bf16 and fp16, and MiniLM at fp32 and bf16.
fn repository() -> TempDir {
    let repo = TempDir::new("precision");
    for (name, precision) in [("cnn", "fp32"), ("cnn-bf16", "bf16"), ("cnn-fp16", "fp16")] {
        let dir = repo.path().join(name);
        copy_dir(&models_dir().join("image-cnn"), &dir);
        edit_model_toml(&dir, |t| {
            t.insert("precision".into(), precision.into());
        });
    }
    // the demo text classifier as first traced: its graph fixed fp32 (and the CPU) in a cast
    let fixed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fixed-dtype/model.pt");
    for (name, precision) in [("fixed-dtype", "fp32"), ("fixed-dtype-bf16", "bf16")] {
        let dir = repo.path().join(name);
        copy_dir(&models_dir().join("text-classifier"), &dir);
        std::fs::copy(&fixed, dir.join("model.pt")).unwrap();
        edit_model_toml(&dir, |t| {
            t.insert("precision".into(), precision.into());
        });
    }
    for (name, precision) in [("minilm", "fp32"), ("minilm-bf16", "bf16")] {
        let dir = repo.path().join(name);
        copy_dir(&fixtures().join("minilm"), &dir);
        edit_model_toml(&dir, |t| {
            t.insert("precision".into(), precision.into());
        });
    }
    repo
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `model`'s predictions for `instances` on /v1 (which must answer 200).
async fn predictions(
    c: &reqwest::Client,
    s: &Server,
    model: &str,
    instances: &Value,
) -> Vec<Value> {
    let r = post_json(
        c,
        &s.url(&format!("/v1/models/{model}/predict")),
        &json!({ "instances": instances }),
    )
    .await;
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    r.json()["predictions"].as_array().unwrap().clone()
}

/// The largest difference between two classifier predictions' per-label scores.
fn score_diff(a: &Value, b: &Value) -> f64 {
    a["scores"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(label, x)| (x.as_f64().unwrap() - b["scores"][label].as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bf16_answers_within_tolerance_of_fp32_and_fp16_is_refused_on_the_cpu() {
    let repo = repository();
    let s = Server::start(repo.path(), &[]);
    assert!(
        s.wait_log("start-up loading finished"),
        "start-up never finished:\n{}",
        s.log_text()
    );
    let c = client();

    // fp16 on the CPU: refused at load with the reason; the other models serve
    let r = get(&c, &s.url("/v1/models/cnn-fp16")).await;
    assert_eq!(r.json()["state"], "failed", "{}", r.text());
    let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("precision fp16 needs a CUDA device") && reason.contains("bf16"),
        "{reason}"
    );
    let r = post_json(
        &c,
        &s.url("/v1/models/cnn-fp16/predict"),
        &json!({"instances": [[[[0.0]]]]}),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());

    // the version shows its precision and its instances' devices
    let detail = get(&c, &s.url("/v1/models/cnn-bf16")).await.json();
    let v = &detail["versions"][0];
    assert_eq!(v["precision"], "bf16", "{detail}");
    assert_eq!(v["instance_devices"], json!(["cpu", "cpu"]), "{detail}");

    // the demo CNN: the same label and scores within the tolerance on every example image
    let mut worst = 0f64;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    for file in ["circle.png", "square.png", "triangle.png", "triangle.jpg"] {
        let body = std::fs::read(examples.join(file)).unwrap();
        let mime = if file.ends_with(".png") {
            "image/png"
        } else {
            "image/jpeg"
        };
        let mut answers = Vec::new();
        for model in ["cnn", "cnn-bf16"] {
            let r = send(
                c.post(s.url(&format!("/v1/models/{model}/predict")))
                    .header("content-type", mime)
                    .body(body.clone()),
            )
            .await;
            assert_eq!(r.status, 200, "{model} {file}: {}", r.text());
            answers.push(r.json()["predictions"][0].clone());
        }
        assert_eq!(answers[0]["label"], answers[1]["label"], "{file}");
        worst = worst.max(score_diff(&answers[0], &answers[1]));
    }
    // noise images: scores far from 0 and 1, where a precision loss shows
    let mut seed = 7u64;
    let mut noise = || {
        let pixels: Vec<Vec<Vec<u8>>> = (0..64)
            .map(|_| {
                (0..64)
                    .map(|_| {
                        (0..3)
                            .map(|_| {
                                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                                (seed >> 56) as u8
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        json!(pixels)
    };
    let images = Value::Array((0..4).map(|_| noise()).collect());
    let fp32 = predictions(&c, &s, "cnn", &images).await;
    let bf16 = predictions(&c, &s, "cnn-bf16", &images).await;
    for (a, b) in fp32.iter().zip(&bf16) {
        worst = worst.max(score_diff(a, b));
    }
    println!("demo CNN: bf16 scores within {worst:.2e} of fp32");
    assert!(
        worst < BF16_SCORE_TOLERANCE,
        "bf16 scores differ by {worst}"
    );
    // and scores that are not all equal: a cast that broke the model would not pass as close
    assert!(worst > 0.0, "bf16 answered exactly as fp32: was it cast?");

    // MiniLM: bf16 embeddings against fp32 and against sentence-transformers
    let reference = reference("minilm");
    let items = reference["items"].as_array().unwrap();
    let texts: Vec<Value> = items.iter().map(|i| i["text"].clone()).collect();
    let texts = Value::Array(texts);
    let embeddings =
        |p: Vec<Value>| -> Vec<Vec<f64>> { p.iter().map(|p| floats(&p["embedding"])).collect() };
    let fp32 = embeddings(predictions(&c, &s, "minilm", &texts).await);
    let bf16 = embeddings(predictions(&c, &s, "minilm-bf16", &texts).await);
    let (mut min_cos, mut max_d, mut max_ref_d) = (1f64, 0f64, 0f64);
    for ((a, b), item) in fp32.iter().zip(&bf16).zip(items) {
        min_cos = min_cos.min(cosine(a, b));
        max_d = max_d.max(max_diff(a, b));
        max_ref_d = max_ref_d.max(max_diff(b, &floats(&item["embedding"])));
        // fp32 still equals the library
        assert!(max_diff(a, &floats(&item["embedding"])) < 1e-5);
    }
    println!(
        "MiniLM: bf16 cosine to fp32 >= {min_cos:.5}, max abs diff {max_d:.2e} (to sentence-transformers {max_ref_d:.2e})"
    );
    assert!(min_cos >= BF16_EMBEDDING_MIN_COSINE, "cosine {min_cos}");
    assert!(max_d < BF16_EMBEDDING_TOLERANCE, "max diff {max_d}");
    assert!(
        max_ref_d < BF16_EMBEDDING_TOLERANCE,
        "max diff to the library {max_ref_d}"
    );
    assert!(max_d > 0.0, "bf16 answered exactly as fp32: was it cast?");

    // a graph that fixes fp32 runs in bf16 under autocast, within the tolerance
    let texts = json!([
        "我爱你",
        "This is terrible",
        "what a lovely day",
        "boring and far too long"
    ]);
    let fp32 = predictions(&c, &s, "fixed-dtype", &texts).await;
    let bf16 = predictions(&c, &s, "fixed-dtype-bf16", &texts).await;
    let mut worst = 0f64;
    for (a, b) in fp32.iter().zip(&bf16) {
        assert_eq!(a["label"], b["label"]);
        worst = worst.max(score_diff(a, b));
    }
    assert!(
        worst < BF16_SCORE_TOLERANCE,
        "bf16 under autocast differs by {worst}"
    );
    assert!(
        s.log_text().contains("running it under autocast"),
        "no autocast fallback logged"
    );

    // no GPU, no GPU gauges
    let metrics = get(&c, &s.url("/metrics")).await.text();
    assert!(
        !metrics.contains("aiaas_gpu_memory_bytes{"),
        "GPU gauges on a machine without GPUs"
    );
}
