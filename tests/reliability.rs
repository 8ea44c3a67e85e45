//! Reliability and security over real HTTP: API keys and scopes, limits, deadlines, the
//! concurrency limit, graceful shutdown under load, and the OpenAPI contract's coverage.

pub mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use futures::future::join_all;
use serde_json::json;
use tower::ServiceExt;

use common::demo::{self, Shape};
use common::*;

const ADMIN_KEY: &str = "admin-key-0123456789abcdef";
const INFER_KEY: &str = "infer-key-0123456789abcdef";

fn keyed_server(extra: &[&str]) -> Server {
    let keys = format!("admin:{ADMIN_KEY},infer:{INFER_KEY}");
    let mut args = vec!["--model-control", "explicit", "--load-model", "regressor"];
    args.extend_from_slice(extra);
    // RUST_LOG=debug: keys must not appear even in debug logs
    let s = Server::start_with_env(
        &models_dir(),
        &args,
        &[("AIAAS_API_KEYS", &keys), ("RUST_LOG", "debug")],
    );
    s.wait_ready();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_and_scopes() {
    let s = keyed_server(&[]);
    let c = client();
    let predict = s.url("/v1/models/regressor/predict");
    let body = json!({"instances": [[0.5]]});

    let r = post_json(&c, &predict, &body).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "unauthorized");
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    let r = send(
        c.post(&predict)
            .bearer_auth("not-a-valid-key-at-all")
            .json(&body),
    )
    .await;
    assert_eq!(r.status, 401);
    for key in [INFER_KEY, ADMIN_KEY] {
        let r = send(c.post(&predict).bearer_auth(key).json(&body)).await;
        assert_eq!(r.status, 200, "{key}");
    }
    // management: admin only
    let load = s.url("/v1/models/image-cnn/load");
    let r = send(c.post(&load).bearer_auth(INFER_KEY)).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "forbidden");
    assert_eq!(send(c.post(&load)).await.status, 401);
    assert_eq!(send(c.post(&load).bearer_auth(ADMIN_KEY)).await.status, 200);
    // v2 answers in its own error format
    let r = send(
        c.post(s.url("/v2/models/regressor/infer"))
            .json(&json!({"inputs": []})),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].is_string());
    let r = send(
        c.post(s.url("/v2/repository/models/regressor/unload"))
            .bearer_auth(INFER_KEY),
    )
    .await;
    assert_eq!(r.status, 403);
    // probes and metrics stay open
    assert_eq!(get(&c, &s.url("/health/ready")).await.status, 200);
    assert_eq!(get(&c, &s.url("/v2/health/live")).await.status, 200);
    let metrics = get(&c, &s.url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"aiaas_rejected_requests_total{reason="unauthenticated"} 4"#),
        "{text}"
    );
    assert!(text.contains(r#"aiaas_rejected_requests_total{reason="forbidden"} 2"#));
    // keys never reach the logs, not even at debug level; the last request's line (debug for
    // /metrics) comes after every earlier one
    assert!(s.wait_log("GET /metrics 200"), "{}", s.log_text());
    let log = s.log_text();
    assert!(log.contains("API keys loaded"));
    assert!(
        !log.contains(ADMIN_KEY) && !log.contains(INFER_KEY) && !log.contains("0123456789abcdef"),
        "a key was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_can_require_a_key() {
    let s = keyed_server(&["--metrics-auth"]);
    let c = client();
    assert_eq!(get(&c, &s.url("/metrics")).await.status, 401);
    assert_eq!(
        send(c.get(s.url("/metrics")).bearer_auth(INFER_KEY))
            .await
            .status,
        200
    );
    assert_eq!(get(&c, &s.url("/health/live")).await.status, 200);
}

/// Drives the router in process (no socket) with a chosen peer address.
async fn as_peer(app: &axum::Router, peer: &str, method: &str, path: &str) -> u16 {
    let mut req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    app.clone().oneshot(req).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn without_keys_management_is_for_loopback_only() {
    let repo = TempDir::new("empty");
    let build = aiaas::server::build_info();
    let metrics = aiaas::telemetry::Metrics::new(&build);
    let registry = aiaas::registry::Registry::new(
        aiaas::repository::ModelRepository::new(repo.path()),
        Default::default(),
        std::sync::Arc::new(aiaas::engine::torch::TorchEngines),
        metrics.clone(),
    );
    let settings = aiaas::http::HttpSettings {
        model_control: aiaas::config::ModelControl::Explicit,
        ..Default::default()
    };
    let app = aiaas::app(aiaas::AppState::new(
        registry.clone(),
        metrics.clone(),
        settings.clone(),
    ));
    // from elsewhere: refused before anything happens
    assert_eq!(
        as_peer(&app, "10.1.2.3:4000", "POST", "/v1/models/m/load").await,
        403
    );
    assert_eq!(
        as_peer(
            &app,
            "10.1.2.3:4000",
            "POST",
            "/v2/repository/models/m/unload"
        )
        .await,
        403
    );
    // predictions and metadata are open without keys
    assert_eq!(
        as_peer(&app, "10.1.2.3:4000", "GET", "/v1/models").await,
        200
    );
    // from loopback: allowed through to the handler (the model does not exist: 404)
    assert_eq!(
        as_peer(&app, "127.0.0.1:4000", "POST", "/v1/models/m/load").await,
        404
    );
    assert_eq!(
        as_peer(&app, "[::1]:4000", "POST", "/v1/models/m/load").await,
        404
    );
    // or from anywhere with --allow-unauthenticated-admin
    let open = aiaas::app(aiaas::AppState::new(
        registry,
        metrics,
        aiaas::http::HttpSettings {
            allow_unauthenticated_admin: true,
            ..settings
        },
    ));
    assert_eq!(
        as_peer(&open, "10.1.2.3:4000", "POST", "/v1/models/m/load").await,
        404
    );
}

/// A PNG whose header claims `w` x `h` pixels, with almost no data behind it.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(kind);
        out.extend(data);
        let mut crc = 0xffff_ffffu32;
        for &b in kind.iter().chain(data) {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        out.extend((!crc).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn size_limits_refuse_before_work() {
    let s = Server::start(
        &models_dir(),
        &[
            "--max-instances",
            "8",
            "--max-text-bytes",
            "100",
            "--max-image-dim",
            "4096",
        ],
    );
    s.wait_ready();
    let c = client();
    let r = post_json(
        &c,
        &s.url("/v1/models/regressor/predict"),
        &json!({"instances": vec![[0.5]; 9]}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (413, "payload_too_large")
    );
    let r = post_json(
        &c,
        &s.url("/v1/models/text-classifier/predict"),
        &json!({"instances": ["x".repeat(101)]}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (413, "payload_too_large")
    );
    // a decompression bomb: the header claims 100000 x 100000 pixels (30 GB decoded)
    let url = s.url("/v1/models/image-cnn/predict");
    let r = send(
        c.post(&url)
            .header("content-type", "image/png")
            .body(png_claiming(100_000, 100_000)),
    )
    .await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("100000x100000"));
    // the same through v2 BYTES
    let bomb = png_claiming(50_000, 50_000);
    let mut body = serde_json::to_vec(
        &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
        "parameters": {"binary_data_size": bomb.len() + 4}}]}),
    )
    .unwrap();
    let header_len = body.len();
    body.extend((bomb.len() as u32).to_le_bytes());
    body.extend(&bomb);
    let r = send(
        c.post(s.url("/v2/models/image-cnn/infer"))
            .header("inference-header-content-length", header_len)
            .body(body),
    )
    .await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    // a gzip bomb: 50 MB of zeros in a small body is refused by the body limit after decompression
    let zeros = vec![b' '; 80 << 20];
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut enc, &zeros).unwrap();
    let gz = enc.finish().unwrap();
    assert!(gz.len() < 1 << 20);
    let r = send(
        c.post(s.url("/v1/models/regressor/predict"))
            .header("content-encoding", "gzip")
            .header("content-type", "application/json")
            .body(gz),
    )
    .await;
    assert_eq!(r.status, 413);
    // still fine
    assert_eq!(
        post_json(
            &c,
            &s.url("/v1/models/regressor/predict"),
            &json!({"instances": [[1.0]]})
        )
        .await
        .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_drop_requests_that_cannot_start_in_time() {
    let repo = slow_image_repo();
    let s = Server::start(repo.path(), &[]);
    s.wait_ready();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let png = demo::png(&demo::draw(Shape::Circle, 64, &mut rand::rng()));
    // 40 requests keep the single instance busy for a while
    let busy: Vec<_> = (0..40)
        .map(|_| {
            tokio::spawn(send(
                c.post(&url)
                    .header("content-type", "image/png")
                    .body(png.clone()),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = send(
        c.post(&url)
            .header("content-type", "image/png")
            .header("x-request-timeout-ms", "1")
            .body(png.clone()),
    )
    .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), "timeout");
    // the v2 timeout parameter (microseconds) does the same, answered 503 as Triton does
    let body = json!({"parameters": {"timeout": 1000}, "inputs": [{"name": "image", "shape": [1, 3, 64, 64],
        "datatype": "FP32", "data": vec![0.5; 3 * 64 * 64]}]});
    let r = post_json(&c, &s.url("/v2/models/image-cnn/infer"), &body).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    for b in busy {
        assert_eq!(b.await.unwrap().status, 200);
    }
    let text = String::from_utf8_lossy(&get(&c, &s.url("/metrics")).await.body).to_string();
    assert!(
        text.contains(r#"aiaas_requests_total{model="image-cnn",outcome="timeout",protocol="http",version="1"} 2"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_limit_answers_503_at_once() {
    let repo = slow_image_repo();
    let s = Server::start(repo.path(), &["--max-concurrent-requests", "3"]);
    s.wait_ready();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let png = demo::png(&demo::draw(Shape::Square, 64, &mut rand::rng()));
    let replies = join_all((0..40).map(|_| {
        send(
            c.post(&url)
                .header("content-type", "image/png")
                .body(png.clone()),
        )
    }))
    .await;
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(
        !refused.is_empty(),
        "40 concurrent requests never hit a limit of 3"
    );
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 503));
    // each of the first three to arrive finds a permit free
    let answered = replies.iter().filter(|r| r.status == 200).count();
    assert!(answered >= 3, "{answered} answered under a limit of 3");
    for r in &refused {
        assert_eq!(r.error_code(), "overloaded");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    let text = String::from_utf8_lossy(&get(&c, &s.url("/metrics")).await.body).to_string();
    let counted: f64 = text
        .lines()
        .find(|l| l.starts_with(r#"aiaas_rejected_requests_total{reason="concurrency_limit"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(counted as usize, refused.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_every_accepted_request() {
    let mut s = Server::start(
        &models_dir(),
        &[
            "--load-model",
            "image-cnn",
            "--shutdown-delay",
            "0.5",
            "--shutdown-timeout",
            "20",
        ],
    );
    s.wait_ready();
    let s_url = s.url("/v1/models/image-cnn/predict");
    // a new connection per request: after the listener closes, a client sees a refusal
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let png = demo::png(&demo::draw(Shape::Triangle, 64, &mut rand::rng()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, other) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (c, url, png, stop, ok, refused, other) = (
                c.clone(),
                s_url.clone(),
                png.clone(),
                stop.clone(),
                ok.clone(),
                refused.clone(),
                other.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match c
                        .post(&url)
                        .header("content-type", "image/png")
                        .body(png.clone())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            match r.bytes().await {
                                Ok(b)
                                    if status == 200
                                        && serde_json::from_slice::<serde_json::Value>(&b)
                                            .is_ok() =>
                                {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(b) => other
                                    .lock()
                                    .unwrap()
                                    .push(format!("{status}: {}", String::from_utf8_lossy(&b))),
                                Err(e) => {
                                    other.lock().unwrap().push(format!("truncated body: {e}"))
                                }
                            }
                        }
                        // Refused: nothing listens any more; or reset: the connection was
                        // still in the kernel's accept queue when the listener closed, so the
                        // server never read the request (fresh connection, no response byte).
                        Err(e) if e.is_connect() || is_reset_before_response(&e) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => other.lock().unwrap().push(format!("error: {e:?}")),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = ok.load(Ordering::Relaxed);
    s.signal("TERM");
    // during --shutdown-delay, readiness already fails while predictions are still served
    tokio::time::sleep(Duration::from_millis(150)).await;
    let ready = blocking_get(&s.url("/health/ready"))
        .map(|r| r.0)
        .unwrap_or(0);
    assert_eq!(ready, 503, "readiness must fail at once after SIGTERM");
    let code = s.wait_exit(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    join_all(clients).await;
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let other = other.lock().unwrap().clone();
    eprintln!("SIGTERM under load: {ok} answered ({before} before the signal), {refused} refused, {} other", other.len());
    assert_eq!(code, Some(0), "exit status");
    assert!(other.is_empty(), "lost or failed requests: {other:?}");
    assert!(ok > before, "nothing was served after the signal");
    // the server answered exactly what it logged as answered: nothing accepted was dropped
    let answered = s
        .log_text()
        .lines()
        .filter(|l| l.contains("POST /v1/models/{name}/predict 200"))
        .count();
    assert_eq!(
        answered, ok,
        "server answered {answered}, clients received {ok}"
    );
}

use std::sync::Mutex;

/// A request on a fresh connection reset before any response byte arrived.
fn is_reset_before_response(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionReset;
        }
        source = s.source();
    }
    false
}

#[test]
fn openapi_documents_every_route_and_only_those() {
    let spec = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml"),
    )
    .unwrap();
    // paths are 2-space keys under `paths:`, methods 4-space keys under them
    let mut documented = std::collections::BTreeSet::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in spec.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = format!("/{p}");
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                documented.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    let served: std::collections::BTreeSet<(String, String)> = aiaas::http::routes()
        .into_iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.yaml: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "openapi.yaml documents routes the server lacks: {stale:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_keep_alive_clients_cuts_no_request() {
    let mut s = Server::start(
        &models_dir(),
        &["--load-model", "regressor", "--shutdown-delay", "1"],
    );
    s.wait_ready();
    let url = s.url("/v1/models/regressor/predict");
    // one pooled client: its 16 tasks reuse keep-alive connections, as requests.Session does
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, lost) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, url, stop, ok, refused, lost) = (
                c.clone(),
                url.clone(),
                stop.clone(),
                ok.clone(),
                refused.clone(),
                lost.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match c
                        .post(&url)
                        .json(&json!({"instances": [[0.5]]}))
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let status = r.status();
                            match r.bytes().await {
                                Ok(_) if status == 200 => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(_) => lost.lock().unwrap().push(format!("status {status}")),
                                Err(e) => lost.lock().unwrap().push(format!("body: {e:?}")),
                            }
                        }
                        // nothing listens any more (or the connection was still in the accept
                        // queue when the listener closed): never accepted
                        Err(e) if e.is_connect() || is_reset_before_response(&e) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        // e.g. "connection closed before message completed": a request sent
                        // down a keep-alive connection the server closed
                        Err(e) => lost.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = ok.load(Ordering::Relaxed);
    s.signal("TERM");
    let code = s.wait_exit(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    join_all(tasks).await;
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let lost = lost.lock().unwrap().clone();
    eprintln!(
        "SIGTERM with keep-alive clients: {ok} answered ({before} before the signal), {refused} \
         refused, {} lost",
        lost.len()
    );
    assert_eq!(code, Some(0));
    assert!(lost.is_empty(), "requests cut: {lost:?}");
    // requests flowed on both sides of the signal, so an empty `lost` says something
    assert!(before > 0, "nothing was answered before the signal");
    assert!(ok > before, "nothing was answered after the signal");
}
