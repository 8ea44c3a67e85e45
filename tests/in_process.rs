//! The real router over a fake engine, in-process: `aiaas::app(state)` driven with `oneshot`,
//! no socket and no libtorch. The registry builds engines through the factory it is given, so
//! HTTP-level behaviour (routes, codecs, batching, errors, model states) is tested here without
//! TorchScript files. The memory budget and lazy loading are tested here too, over engines whose
//! footprint the test sets.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use aiaas::config::model_spec::ModelSpec;
use aiaas::config::ModelControl;
use aiaas::engine::{Engine, EngineError, EngineFactory, LoadedEngine};
use aiaas::http::HttpSettings;
use aiaas::registry::{Registry, RegistrySettings};
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
        if values.contains(&999.0) {
            return Err(EngineError::DeviceFailed {
                device: "fake".into(),
                message: "CUDA out of memory. Tried to allocate 2.00 GiB".into(),
            });
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
    registry: Arc<Registry>,
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
    let models: Vec<(&str, String, &str)> =
        names.iter().map(|n| (*n, REGRESSOR.into(), "")).collect();
    app_with(&models, Default::default(), Arc::new(FakeEngines)).await
}

/// A repository of `(name, model.toml, model file contents)`, loaded by `engines` with
/// `settings` (the management API open when `settings.lazy`), behind the real router.
async fn app_with(
    models: &[(&str, String, &str)],
    settings: RegistrySettings,
    engines: Arc<dyn EngineFactory>,
) -> App {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("aiaas-in-process-{}-{n}", std::process::id()));
    for (name, toml, file) in models {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.toml"), toml).unwrap();
        std::fs::write(dir.join("model.pt"), file).unwrap();
    }
    let metrics = aiaas::telemetry::Metrics::new(&aiaas::server::build_info());
    let lazy = settings.lazy;
    let registry = Registry::new(
        ModelRepository::new(&root),
        settings,
        engines,
        metrics.clone(),
    );
    registry.load_startup(None).await.unwrap();
    let http = HttpSettings {
        model_control: if lazy {
            ModelControl::Lazy
        } else {
            ModelControl::None
        },
        // no peer address in-process: management would count as remote
        allow_unauthenticated_admin: true,
        ..Default::default()
    };
    let state = aiaas::AppState::new(registry.clone(), metrics, http);
    App {
        router: aiaas::app(state),
        registry,
        _dir: tempdir::Dir(root),
    }
}

async fn call(app: &App, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, _, json) = call_with_headers(app, method, path, body).await;
    (status, json)
}

async fn call_with_headers(
    app: &App,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
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
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, json)
}

/// `/v1/models/{name}` says the model failed, for a reason containing `reason`.
async fn assert_failed(app: &App, name: &str, reason: &str) {
    let (status, body) = call(app, "GET", &format!("/v1/models/{name}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "failed", "{body}");
    assert!(
        body["reason"].as_str().unwrap_or_default().contains(reason),
        "{body}"
    );
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
    assert_failed(&app, "broken", "the fake runtime refuses it").await;
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

// ---- the memory budget and lazy loading, over engines of a set footprint ----

/// Engines whose footprint is the number of MiB written in their model file, counted in
/// `in_use` from load until dropped, as a runtime's allocator would. They double their input;
/// a batch holding 777 waits while `hold` is set.
#[derive(Default)]
struct SizedEngines {
    in_use: Arc<AtomicU64>,
    loads: AtomicUsize,
    load_delay_ms: AtomicU64,
    hold: Arc<std::sync::atomic::AtomicBool>,
    entered: Arc<AtomicUsize>,
}

struct SizedEngine {
    bytes: u64,
    in_use: Arc<AtomicU64>,
    hold: Arc<std::sync::atomic::AtomicBool>,
    entered: Arc<AtomicUsize>,
}

impl Engine for SizedEngine {
    fn forward(&mut self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        let values = inputs[0].to_f32_vec();
        if values.contains(&777.0) {
            self.entered.fetch_add(1, Ordering::SeqCst);
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Doubler.forward(inputs)
    }
}

impl Drop for SizedEngine {
    fn drop(&mut self) {
        self.in_use.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl EngineFactory for SizedEngines {
    fn load(&self, spec: &ModelSpec, _index: usize) -> Result<LoadedEngine, EngineError> {
        let mib: u64 = std::fs::read_to_string(&spec.file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let bytes = mib << 20;
        std::thread::sleep(Duration::from_millis(
            self.load_delay_ms.load(Ordering::SeqCst),
        ));
        self.in_use.fetch_add(bytes, Ordering::SeqCst);
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(LoadedEngine {
            engine: Box::new(SizedEngine {
                bytes,
                in_use: self.in_use.clone(),
                hold: self.hold.clone(),
                entered: self.entered.clone(),
            }),
            device: "cpu".into(),
        })
    }

    fn memory_in_use(&self, device: &str) -> Option<u64> {
        (device == "cpu").then(|| self.in_use.load(Ordering::SeqCst))
    }
}

const MIB: u64 = 1 << 20;

/// Lazy model control with `budget` over regressors `(name, MiB, pinned)`.
async fn lazy_app(
    models: &[(&str, &str, bool)],
    budget: &str,
    lazy: bool,
) -> (App, Arc<SizedEngines>) {
    let engines = Arc::new(SizedEngines::default());
    let models: Vec<(&str, String, &str)> = models
        .iter()
        .map(|(name, mib, pinned)| {
            let toml = format!("pinned = {pinned}\n{REGRESSOR}");
            (*name, toml, *mib)
        })
        .collect();
    let settings = RegistrySettings {
        memory_budget: budget.parse().unwrap(),
        lazy,
        ..Default::default()
    };
    (app_with(&models, settings, engines.clone()).await, engines)
}

/// Predicts on `model`; returns the status and `x-model-loaded`.
async fn predict(app: &App, model: &str, x: f32) -> (StatusCode, String, Value) {
    let (status, headers, body) = call_with_headers(
        app,
        "POST",
        &format!("/v1/models/{model}/predict"),
        Some(json!({"instances": [x]})),
    )
    .await;
    let loaded = headers
        .get("x-model-loaded")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, loaded, body)
}

async fn state_of(app: &App, model: &str) -> (String, String) {
    let (_, body) = call(app, "GET", &format!("/v1/models/{model}"), None).await;
    (
        body["state"].as_str().unwrap_or_default().to_string(),
        body["reason"].as_str().unwrap_or_default().to_string(),
    )
}

async fn metric(app: &App, series: &str) -> Option<f64> {
    let response = app
        .router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn lazy_models_load_on_first_request_and_the_least_recently_used_go_first() {
    let (app, engines) = lazy_app(
        &[
            ("a", "100", false),
            ("b", "100", false),
            ("c", "100", false),
        ],
        "250MiB",
        true,
    )
    .await;
    // every model listed, none in memory, and the server ready without them
    let (_, list) = call(&app, "GET", "/v1/models", None).await;
    let states: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["unloaded"; 3], "{list}");
    assert_eq!(
        call(&app, "GET", "/health/ready", None).await.0,
        StatusCode::OK
    );
    assert_ne!(
        call(&app, "GET", "/v2/models/a/ready", None).await.0,
        StatusCode::OK
    );
    assert_eq!(engines.loads.load(Ordering::SeqCst), 0);

    // the first request loads (cold), the next ones find it (warm)
    let (status, loaded, body) = predict(&app, "a", 1.5).await;
    assert_eq!(
        (status, loaded.as_str()),
        (StatusCode::OK, "cold"),
        "{body}"
    );
    assert_eq!(body["predictions"], json!([3.0]));
    assert_eq!(predict(&app, "a", 1.0).await.1, "warm");
    assert_eq!(
        call(&app, "GET", "/v2/models/a/ready", None).await.0,
        StatusCode::OK
    );
    assert_eq!(predict(&app, "b", 1.0).await.1, "cold");
    // a is used after b: b is the least recently used when c needs room
    assert_eq!(predict(&app, "a", 1.0).await.1, "warm");
    let (status, loaded, _) = predict(&app, "c", 1.0).await;
    assert_eq!((status, loaded.as_str()), (StatusCode::OK, "cold"));
    let (state, reason) = state_of(&app, "b").await;
    assert_eq!(state, "unloaded");
    assert!(
        reason.contains("evicted") && reason.contains("'c'"),
        "{reason}"
    );
    assert_eq!(state_of(&app, "a").await.0, "ready");
    // its memory is given back, and the accounting says so
    assert_eq!(engines.in_use.load(Ordering::SeqCst), 200 * MIB);
    assert_eq!(
        metric(&app, r#"aiaas_model_memory_resident_bytes{device="cpu"}"#).await,
        Some((200 * MIB) as f64)
    );
    let (_, a) = call(&app, "GET", "/v1/models/a", None).await;
    assert_eq!(a["versions"][0]["memory_bytes"], json!(100 * MIB), "{a}");
    assert_eq!(
        metric(&app, r#"aiaas_model_evictions_total{model="b"}"#).await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &app,
            r#"aiaas_model_loads_total{model="a",reason="on_demand"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&app, r#"aiaas_model_memory_budget_bytes{device="cpu"}"#).await,
        Some((250 * MIB) as f64)
    );

    // b comes back on demand, evicting a (used before c)
    assert_eq!(predict(&app, "b", 1.0).await.1, "cold");
    assert_eq!(state_of(&app, "a").await.0, "unloaded");
    assert_eq!(state_of(&app, "c").await.0, "ready");
    // the management API unloads (and the next request loads again)
    let (status, body) = call(&app, "POST", "/v1/models/c/unload", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "unloaded");
    assert_eq!(predict(&app, "c", 1.0).await.1, "cold");
    assert_eq!(engines.loads.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn pinned_models_load_at_start_and_are_never_evicted() {
    let (app, engines) = lazy_app(
        &[("a", "100", false), ("b", "100", false), ("p", "100", true)],
        "250MiB",
        true,
    )
    .await;
    assert_eq!(state_of(&app, "p").await.0, "ready");
    assert_eq!(engines.loads.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(
            &app,
            r#"aiaas_model_loads_total{model="p",reason="startup"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(predict(&app, "a", 1.0).await.0, StatusCode::OK);
    // p is the least recently used, but pinned: a goes
    assert_eq!(predict(&app, "b", 1.0).await.0, StatusCode::OK);
    assert_eq!(state_of(&app, "a").await.0, "unloaded");
    assert_eq!(state_of(&app, "p").await.0, "ready");
    assert_eq!(predict(&app, "p", 1.0).await.1, "warm");
}

#[tokio::test]
async fn a_model_with_work_in_flight_is_never_evicted() {
    let (app, engines) =
        lazy_app(&[("a", "100", false), ("b", "100", false)], "150MiB", true).await;
    assert_eq!(predict(&app, "a", 1.0).await.0, StatusCode::OK);
    engines.hold.store(true, Ordering::SeqCst);
    let router = app.router.clone();
    let held = tokio::spawn(async move {
        let req = Request::post("/v1/models/a/predict")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"instances": [777]}"#))
            .unwrap();
        router.oneshot(req).await.unwrap().status()
    });
    while engines.entered.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // no room while a is busy: b waits for it within its deadline, then is refused with the
    // reason, and stays listed
    let b_within = |ms: u64| {
        let req = Request::post("/v1/models/b/predict")
            .header("content-type", "application/json")
            .header("x-request-timeout-ms", ms.to_string())
            .body(Body::from(r#"{"instances": [1.0]}"#))
            .unwrap();
        app.router.clone().oneshot(req)
    };
    let response = b_within(500).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let message = String::from_utf8_lossy(&body);
    assert!(message.contains("'a' (busy"), "{message}");
    assert_eq!(state_of(&app, "b").await.0, "unloaded");
    assert_eq!(state_of(&app, "a").await.0, "ready");
    // b asks again with time to spare; a's request completes meanwhile; then b gets its room
    let waiting = tokio::spawn(b_within(20_000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state_of(&app, "a").await.0, "ready");
    engines.hold.store(false, Ordering::SeqCst);
    assert_eq!(held.await.unwrap(), StatusCode::OK);
    let response = waiting.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-model-loaded"], "cold");
    assert_eq!(state_of(&app, "a").await.0, "unloaded");
}

#[tokio::test]
async fn a_model_larger_than_the_budget_fails_without_evicting_the_others() {
    let (app, engines) = lazy_app(
        &[("a", "100", false), ("big", "200", false)],
        "150MiB",
        true,
    )
    .await;
    assert_eq!(predict(&app, "a", 1.0).await.0, StatusCode::OK);
    let (status, _, body) = predict(&app, "big", 1.0).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("200.0MiB on cpu, more than the whole model memory budget of 150.0MiB"),
        "{message}"
    );
    let (state, reason) = state_of(&app, "big").await;
    assert_eq!(state, "failed", "{reason}");
    assert_eq!(state_of(&app, "a").await.0, "ready");
    assert_eq!(engines.in_use.load(Ordering::SeqCst), 100 * MIB);
    // known too large now: refused at once, without another load
    let loads = engines.loads.load(Ordering::SeqCst);
    assert_eq!(
        predict(&app, "big", 1.0).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(engines.loads.load(Ordering::SeqCst), loads);
    assert_eq!(
        metric(&app, r#"aiaas_model_evictions_total{model="a"}"#).await,
        None
    );
}

#[tokio::test]
async fn concurrent_first_requests_wait_for_one_load() {
    let (app, engines) = lazy_app(&[("a", "10", false)], "1GiB", true).await;
    let replies = futures::future::join_all((0..16).map(|i| {
        let router = app.router.clone();
        async move {
            let req = Request::post("/v1/models/a/predict")
                .header("content-type", "application/json")
                .body(Body::from(format!(r#"{{"instances": [{i}]}}"#)))
                .unwrap();
            let response = router.oneshot(req).await.unwrap();
            (
                response.status(),
                response.headers()["x-model-loaded"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            )
        }
    }))
    .await;
    assert!(
        replies.iter().all(|(s, _)| *s == StatusCode::OK),
        "{replies:?}"
    );
    assert!(replies.iter().any(|(_, l)| l == "cold"), "{replies:?}");
    assert_eq!(engines.loads.load(Ordering::SeqCst), 1);
    let waited = metric(&app, r#"aiaas_model_load_wait_seconds_count{model="a"}"#).await;
    assert!(waited.is_some_and(|n| n >= 1.0), "{waited:?}");
}

#[tokio::test]
async fn without_lazy_loading_a_budget_refuses_what_does_not_fit() {
    let (app, _) = lazy_app(&[("a", "100", false), ("b", "100", false)], "150MiB", false).await;
    let mut states = vec![state_of(&app, "a").await, state_of(&app, "b").await];
    states.sort();
    assert_eq!(states[1].0, "ready", "{states:?}");
    assert_eq!(states[0].0, "failed", "{states:?}");
    assert!(states[0].1.contains("(loaded, 100.0MiB)"), "{states:?}");
}

#[tokio::test]
async fn lazy_repository_scans_list_new_models_and_load_nothing_by_themselves() {
    let (app, engines) =
        lazy_app(&[("a", "100", false), ("b", "100", false)], "150MiB", true).await;
    assert_eq!(predict(&app, "a", 1.0).await.0, StatusCode::OK);
    assert_eq!(predict(&app, "b", 1.0).await.0, StatusCode::OK);
    assert_eq!(state_of(&app, "a").await.0, "unloaded");
    // a scan reloads only what is in memory and changed: evicted a stays out
    app.registry.poll_once().await;
    assert_eq!(state_of(&app, "a").await.0, "unloaded");
    assert_eq!(engines.loads.load(Ordering::SeqCst), 2);

    // a folder and a version added on disk: a request loads them before any scan
    let root = app._dir.0.clone();
    std::fs::create_dir_all(root.join("c")).unwrap();
    std::fs::write(
        root.join("c/model.toml"),
        format!("pinned = false\n{REGRESSOR}"),
    )
    .unwrap();
    std::fs::write(root.join("c/model.pt"), "10").unwrap();
    let (status, loaded, body) = predict(&app, "c", 2.0).await;
    assert_eq!(
        (status, loaded.as_str()),
        (StatusCode::OK, "cold"),
        "{body}"
    );
    // the next scan lists what it finds as unloaded
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(
        root.join("d/model.toml"),
        format!("pinned = false\n{REGRESSOR}"),
    )
    .unwrap();
    std::fs::write(root.join("d/model.pt"), "10").unwrap();
    app.registry.poll_once().await;
    assert_eq!(state_of(&app, "d").await.0, "unloaded");
    assert_eq!(engines.loads.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_request_waits_for_a_load_at_most_its_deadline_and_the_load_goes_on() {
    let (app, engines) = lazy_app(&[("slow", "10", false)], "1GiB", true).await;
    engines.load_delay_ms.store(600, Ordering::SeqCst);
    let req = Request::post("/v1/models/slow/predict")
        .header("content-type", "application/json")
        .header("x-request-timeout-ms", "100")
        .body(Body::from(r#"{"instances": [1]}"#))
        .unwrap();
    let started = std::time::Instant::now();
    let response = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // the load the request gave up on finishes for the next one
    let mut state = String::new();
    for _ in 0..100 {
        state = state_of(&app, "slow").await.0;
        if state == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "ready");
    assert_eq!(predict(&app, "slow", 1.0).await.1, "warm");
    assert_eq!(engines.loads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn lazy_loading_serves_versions_and_counts_each_one() {
    let engines = Arc::new(SizedEngines::default());
    let toml = format!("pinned = false\n{REGRESSOR}\n[version_policy]\nall = true\n");
    let app = app_with(
        &[("m", toml, "")],
        RegistrySettings {
            memory_budget: "1GiB".parse().unwrap(),
            lazy: true,
            ..Default::default()
        },
        engines.clone(),
    )
    .await;
    let root = app._dir.0.clone();
    for (v, mib) in [(1, "30"), (2, "40")] {
        std::fs::create_dir_all(root.join(format!("m/{v}"))).unwrap();
        std::fs::write(root.join(format!("m/{v}/model.pt")), mib).unwrap();
    }
    // versions on disk before any scan: asking for one loads the model's selected versions
    let (status, headers, body) = call_with_headers(
        &app,
        "POST",
        "/v1/models/m/versions/1/predict",
        Some(json!({"instances": [1]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-model-loaded"], "cold");
    assert_eq!(headers["x-model-version"], "1");
    let (_, m) = call(&app, "GET", "/v1/models/m", None).await;
    assert_eq!(m["default_version"], 2, "{m}");
    let bytes: Vec<u64> = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["memory_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(bytes, [30 * MIB, 40 * MIB]);
    assert_eq!(
        metric(&app, r#"aiaas_model_memory_resident_bytes{device="cpu"}"#).await,
        Some((70 * MIB) as f64)
    );
    let (status, loaded, _) = predict(&app, "m", 1.0).await;
    assert_eq!((status, loaded.as_str()), (StatusCode::OK, "warm"));
}

#[tokio::test]
async fn a_device_failure_fails_the_batch_with_503_and_the_model_until_it_is_loaded_again() {
    let app = app(&["twice", "other"]).await;
    let (status, headers, body) = call_with_headers(
        &app,
        "POST",
        "/v1/models/twice/predict",
        Some(json!({"instances": [999, 1]})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "device_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("device fake failed: CUDA out of memory"),
        "{message}"
    );
    assert!(headers.contains_key("retry-after"));
    // the model is failed with the reason, found without a request or a scrape
    let (state, reason) = state_of(&app, "twice").await;
    assert_eq!(state, "failed", "{reason}");
    assert!(reason.contains("out of memory"), "{reason}");
    assert_eq!(
        metric(
            &app,
            r#"aiaas_requests_total{model="twice",outcome="error",protocol="http",version="1"}"#
        )
        .await,
        Some(1.0)
    );
    let (status, body) = call(
        &app,
        "POST",
        "/v1/models/twice/predict",
        Some(json!({"instances": [1]})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "model_not_ready");
    assert_eq!(predict(&app, "other", 2.0).await.0, StatusCode::OK);
    let (_, ready) = call(&app, "GET", "/health/ready", None).await;
    assert!(ready.to_string().contains("twice"), "{ready}");
}

/// A fake runtime that sees `gpus` CUDA devices: each instance "runs" where model.toml's
/// placement puts it, and every GPU reports fixed allocator bytes.
struct FakeGpus {
    gpus: usize,
}

impl EngineFactory for FakeGpus {
    fn load(&self, spec: &ModelSpec, index: usize) -> Result<LoadedEngine, EngineError> {
        let device = spec
            .instance_device(index, self.gpus)
            .map_err(|m| EngineError::Device(spec.device.to_string(), m))?;
        Ok(LoadedEngine {
            engine: Box::new(Doubler),
            device: device.to_string(),
        })
    }

    fn visible_gpus(&self) -> usize {
        self.gpus
    }

    fn gpu_memory(&self) -> Vec<aiaas::engine::GpuMemory> {
        (0..self.gpus)
            .map(|n| aiaas::engine::GpuMemory {
                device: format!("cuda:{n}"),
                allocated: (n as u64 + 1) << 20,
                reserved: (n as u64 + 2) << 20,
            })
            .collect()
    }
}

#[tokio::test]
async fn instances_spread_over_the_visible_gpus_and_each_shows_its_device() {
    let placed = |device: &str, instances: usize| {
        format!("kind = \"regressor\"\ndevice = {device}\ninstances = {instances}\n")
    };
    let models = [
        ("spread", placed("\"cuda\"", 4), ""),
        ("pinned-list", placed("[\"cuda:1\", \"cuda:0\"]", 3), ""),
        ("missing", placed("\"cuda:2\"", 1), ""),
        ("host", placed("\"cpu\"", 2), ""),
    ];
    let app = app_with(&models, Default::default(), Arc::new(FakeGpus { gpus: 2 })).await;

    let (status, body) = call(&app, "GET", "/v1/models/spread", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = &body["versions"][0];
    // the round-robin starts at a GPU chosen by the model's name, then alternates
    let devices: Vec<&str> = v["instance_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let (first, other) = (
        devices[0],
        if devices[0] == "cuda:0" {
            "cuda:1"
        } else {
            "cuda:0"
        },
    );
    assert_eq!(devices, [first, other, first, other], "{body}");
    assert_eq!(v["device"], first);
    assert_eq!(v["precision"], "fp32");
    // Triton's instance_group: one KIND_GPU group per GPU, its instances counted
    let (_, config) = call(&app, "GET", "/v2/models/spread/config", None).await;
    let gpu = |d: &str| d.trim_start_matches("cuda:").parse::<u64>().unwrap();
    assert_eq!(
        config["instance_group"],
        json!([
            {"name": "spread", "kind": "KIND_GPU", "count": 2, "gpus": [gpu(first)]},
            {"name": "spread", "kind": "KIND_GPU", "count": 2, "gpus": [gpu(other)]},
        ])
    );

    let (_, body) = call(&app, "GET", "/v1/models/pinned-list", None).await;
    assert_eq!(
        body["versions"][0]["instance_devices"],
        json!(["cuda:1", "cuda:0", "cuda:1"])
    );
    let (_, config) = call(&app, "GET", "/v2/models/host/config", None).await;
    assert_eq!(
        config["instance_group"],
        json!([{"name": "host", "kind": "KIND_CPU", "count": 2}])
    );

    // a GPU that is not there fails that model with the reason; the others serve
    assert_failed(
        &app,
        "missing",
        "cuda:2 asked for, 2 CUDA device(s) visible",
    )
    .await;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/models/spread/predict",
        Some(json!({"instances": [1.5]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // each GPU's allocator bytes, as the runtime reports them
    let response = app
        .router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    for line in [
        "aiaas_gpu_memory_bytes{device=\"cuda:0\",kind=\"allocated\"} 1048576",
        "aiaas_gpu_memory_bytes{device=\"cuda:1\",kind=\"reserved\"} 3145728",
    ] {
        assert!(text.contains(line), "{line} missing from /metrics");
    }
}
