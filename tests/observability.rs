//! Observability with the real tools: promtool on the live /metrics, a real Prometheus scraping
//! the server on loopback, request-scoped JSON logs, and the Grafana dashboard's queries.
//! promtool and prometheus come from the Debian package `prometheus` (`make test` installs it).

pub mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

fn require(tool: &str) -> std::path::PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(tool))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{tool} not found: run `make test`, which installs it (.ci/test-tools.sh)")
    })
}

async fn metrics_text(c: &reqwest::Client, s: &Server) -> String {
    let r = get(c, &s.url("/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// Metric family names declared in an exposition (`# TYPE name kind`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

async fn some_traffic(c: &reqwest::Client, s: &Server, n: usize) {
    for i in 0..n {
        let r = post_json(
            c,
            &s.url("/v1/models/regressor/predict"),
            &json!({"instances": [[i as f64 / n as f64]]}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promtool_accepts_the_live_metrics() {
    let promtool = require("promtool");
    let s = Server::bundled();
    let c = client();
    some_traffic(&c, &s, 5).await;
    // and a few failures, so that every kind of series exists
    post_json(
        &c,
        &s.url("/v1/models/regressor/predict"),
        &json!({"instances": []}),
    )
    .await;
    post_json(
        &c,
        &s.url("/v1/models/nope/predict"),
        &json!({"instances": [1]}),
    )
    .await;
    let text = metrics_text(&c, &s).await;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );

    // the families the operator needs, with their conventions
    let f = families(&text);
    for name in [
        "aiaas_requests_total",
        "aiaas_request_duration_seconds",
        "aiaas_queue_duration_seconds",
        "aiaas_compute_duration_seconds",
        "aiaas_batch_size",
        "aiaas_inferences_total",
        "aiaas_executions_total",
        "aiaas_pending_requests",
        "aiaas_model_state",
        "aiaas_model_load_duration_seconds",
        "aiaas_http_requests_total",
        "aiaas_http_request_duration_seconds",
        "aiaas_http_requests_in_flight",
        "aiaas_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(f.contains(name), "missing {name}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    // latency buckets resolve 100 µs to 10 s
    assert!(text.contains(
        r#"aiaas_request_duration_seconds_bucket{model="regressor",version="1",le="0.0001"}"#
    ));
    assert!(text.contains(
        r#"aiaas_request_duration_seconds_bucket{model="regressor",version="1",le="10"}"#
    ));
    // outcomes are counted
    assert!(
        text.contains(r#"aiaas_requests_total{model="regressor",outcome="success",protocol="http",version="1"} 5"#),
        "{text}"
    );
    assert!(text.contains(
        r#"aiaas_requests_total{model="regressor",outcome="client_error",protocol="http",version="1"} 1"#
    ));
    // HTTP series use route templates, never raw paths
    assert!(text.contains(r#"route="/v1/models/{name}/predict""#));
    assert!(
        !text.contains("route=\"/v1/models/regressor"),
        "raw path used as a label"
    );
    assert!(text.contains(r#"aiaas_model_state{model="image-cnn",state="ready",version="1"} 1"#));
    let info = text
        .lines()
        .find(|l| l.starts_with("aiaas_build_info{"))
        .unwrap();
    assert!(
        info.contains("torch_version=\"2.11.0") && info.contains("devices=\"cpu"),
        "{info}"
    );
}

/// A free loopback port (bound and released; Prometheus cannot report one it picked itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    child: std::process::Child,
    base: String,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: &str) -> Prometheus {
    let bin = require("prometheus");
    let dir = TempDir::new("prometheus");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: aiaas\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

/// The single value of an instant PromQL query, once Prometheus has one.
async fn query(c: &reqwest::Client, p: &Prometheus, promql: &str) -> Option<f64> {
    let r = c
        .get(format!("{}/api/v1/query", p.base))
        .query(&[("query", promql)])
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    let result = v["data"]["result"].as_array()?;
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_counts_the_predictions() {
    let s = Server::bundled();
    let target = s.base.trim_start_matches("http://").to_string();
    let p = start_prometheus(&target);
    let c = client();
    let sent = 37;
    some_traffic(&c, &s, sent).await;

    let counted = r#"sum(aiaas_requests_total{job="aiaas",model="regressor",outcome="success"})"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        last = query(&c, &p, counted).await;
        if last == Some(sent as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        last,
        Some(sent as f64),
        "Prometheus did not count {sent} predictions"
    );
    assert_eq!(query(&c, &p, r#"up{job="aiaas"}"#).await, Some(1.0));
    let inferred = query(&c, &p, r#"sum(aiaas_inferences_total{model="regressor"})"#).await;
    assert_eq!(inferred, Some(sent as f64));
    let p99 = query(
        &c,
        &p,
        r#"histogram_quantile(0.99, sum by (le) (aiaas_request_duration_seconds_bucket{model="regressor"}))"#,
    )
    .await
    .expect("a p99 from the histogram");
    assert!(p99.is_finite() && p99 > 0.0 && p99 <= 10.0, "p99 {p99}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_logs_tell_one_requests_story() {
    let s = Server::start(
        &models_dir(),
        &["--log-format", "json", "--load-model", "regressor"],
    );
    s.wait_ready();
    let c = client();
    let r = send(
        c.post(s.url("/v1/models/regressor/predict"))
            .header("x-request-id", "story-0042")
            .json(&json!({"instances": [[0.5]]})),
    )
    .await;
    assert_eq!(r.status, 200);
    for h in [
        "x-request-id",
        "x-batch-size",
        "x-queue-time-ms",
        "x-inference-time-ms",
    ] {
        assert!(r.header(h).is_some(), "missing {h}");
    }
    let r = send(
        c.post(s.url("/v1/models/regressor/predict"))
            .header("x-request-id", "story-0043")
            .json(&json!({"instances": "wrong"})),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(s.wait_log("story-0043"), "{}", s.log_text());
    let log = s.log_text();
    let line = |id: &str| -> Value {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        assert_eq!(lines.len(), 1, "one line per request for {id}:\n{log}");
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", lines[0]))
    };
    let ok = line("story-0042");
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["span"]["request_id"], "story-0042");
    assert_eq!(ok["span"]["model"], "regressor");
    assert_eq!(ok["span"]["status"], 200);
    assert_eq!(ok["span"]["route"], "/v1/models/{name}/predict");
    for field in ["queue_ms", "compute_ms", "total_ms", "batch_size"] {
        assert!(ok[field].is_number(), "{field} missing in {ok}");
    }
    let bad = line("story-0043");
    assert_eq!(bad["span"]["status"], 422);
    assert_eq!(bad["code"], "invalid_input");
    assert!(
        bad["error"].as_str().unwrap().contains("instances"),
        "{bad}"
    );
    // every start-up line is JSON too
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{log}"
    );
}

/// Metric names referenced by a PromQL expression (aiaas_* and process_*).
fn referenced_metrics(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            word.push(ch);
        } else {
            if word.starts_with("aiaas_") || word.starts_with("process_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(&word);
                out.push(base.to_string());
            }
            word.clear();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_grafana_dashboard_queries_metrics_the_server_exports() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/grafana/dashboards/aiaas.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        // a row only heads the panels below it
        if panel["type"] == "row" {
            continue;
        }
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let titles: String = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect::<Vec<_>>()
        .join("|");
    for needed in [
        "throughput",
        "p99",
        "batch size",
        "queue depth",
        "error rate",
    ] {
        assert!(titles.contains(needed), "no panel for {needed}: {titles}");
    }
    let s = Server::bundled();
    let c = client();
    some_traffic(&c, &s, 3).await;
    let exported = families(&metrics_text(&c, &s).await);
    for e in &exprs {
        let metrics = referenced_metrics(e);
        assert!(!metrics.is_empty(), "an expression without metrics: {e}");
        // the bundled models include no generative one: src/telemetry/generation.rs's tests
        // check the dashboard's aiaas_generation_* against what a generative model exports;
        // this server has no gRPC port: tests/python/test_grpc.py checks aiaas_grpc_*
        for m in metrics
            .iter()
            .filter(|m| !m.starts_with("aiaas_generation_") && !m.starts_with("aiaas_grpc_"))
        {
            assert!(
                exported.contains(m),
                "dashboard queries {m}, which the server does not export ({e})"
            );
        }
    }
    // the Prometheus config for compose parses and scrapes aiaas
    let prom = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/prometheus.yml"),
    )
    .unwrap();
    assert!(prom.contains("job_name: aiaas") && prom.contains("/metrics"));
}
