//! The real router over a fake engine, in-process: `aiaas::app(state)` driven with `oneshot`,
//! no socket and no libtorch. The registry builds engines through the factory it is given, so
//! HTTP-level behaviour (routes, codecs, batching, errors, model states) is tested here without
//! TorchScript files.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use aiaas::config::model_spec::ModelSpec;
use aiaas::engine::{Engine, EngineError, EngineFactory, LoadedEngine};
use aiaas::registry::Registry;
use aiaas::repository::ModelRepository;
use aiaas::tensor::HostTensor;

/// Doubles its single FP32 input; fails any batch holding 666.
struct Doubler;

impl Engine for Doubler {
    fn forward(&mut self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        let x = &inputs[0];
        let values = x.to_f32_vec();
        if values.contains(&666.0) {
            return Err(EngineError::Forward("poisoned input".into()));
        }
        let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        Ok(vec![
            HostTensor::from_f32(x.shape.clone(), &doubled).unwrap()
        ])
    }
}

/// Loads a [`Doubler`] for every model except those named `broken*`, which fail to load.
struct FakeEngines;

impl EngineFactory for FakeEngines {
    fn load(&self, spec: &ModelSpec, _index: usize) -> Result<LoadedEngine, EngineError> {
        if spec.name.starts_with("broken") {
            return Err(EngineError::Load {
                path: spec.file.display().to_string(),
                message: "the fake runtime refuses it".into(),
            });
        }
        Ok(LoadedEngine {
            engine: Box::new(Doubler),
            device: "fake".into(),
        })
    }
}

const REGRESSOR: &str = r#"
kind = "regressor"
file = "model.pt"
[batching]
max_batch_size = 8
"#;

struct App {
    router: axum::Router,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A temporary folder removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A repository of regressors `names` (model.toml and an empty model file each), loaded through
/// [`FakeEngines`], behind the real router.
async fn app(names: &[&str]) -> App {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("aiaas-in-process-{}-{n}", std::process::id()));
    for name in names {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.toml"), REGRESSOR).unwrap();
        std::fs::write(dir.join("model.pt"), b"").unwrap();
    }
    let metrics = aiaas::telemetry::Metrics::new(&aiaas::server::build_info());
    let registry = Registry::new(
        ModelRepository::new(&root),
        Default::default(),
        Arc::new(FakeEngines),
        metrics.clone(),
    );
    registry.load_startup(None).await.unwrap();
    let state = aiaas::AppState::new(registry, metrics, Default::default());
    App {
        router: aiaas::app(state),
        _dir: tempdir::Dir(root),
    }
}

async fn call(app: &App, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .router
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test]
async fn predictions_go_through_the_factorys_engine_on_v1_and_v2() {
    let app = app(&["twice"]).await;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/models/twice/predict",
        Some(json!({"instances": [1.5, [2.0]]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"], json!([3.0, 4.0]));
    let (status, body) = call(
        &app,
        "POST",
        "/v2/models/twice/infer",
        Some(json!({"inputs": [{"name": "x", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
    let (status, body) = call(&app, "GET", "/v1/models/twice", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["kind"], "regressor");
    assert_eq!(body["versions"][0]["device"], "fake");
}

#[tokio::test]
async fn a_failing_engine_fails_its_request_and_a_failed_load_its_model_only() {
    let app = app(&["twice", "broken"]).await;
    // the engine's error is a 500 for that request; the model keeps serving
    let (status, body) = call(
        &app,
        "POST",
        "/v1/models/twice/predict",
        Some(json!({"instances": [666]})),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("poisoned input"));
    let (status, _) = call(
        &app,
        "POST",
        "/v1/models/twice/predict",
        Some(json!({"instances": [1]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // the load error names the runtime's reason; the model is failed, the other ready
    let (status, body) = call(&app, "GET", "/v1/models/broken", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "failed");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("the fake runtime refuses it"),
        "{body}"
    );
    let (status, body) = call(
        &app,
        "POST",
        "/v1/models/broken/predict",
        Some(json!({"instances": [1]})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (_, body) = call(&app, "GET", "/health/ready", None).await;
    assert!(body.to_string().contains("broken"), "{body}");
}
