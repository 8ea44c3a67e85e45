//! Hostile clients: what one client sends must cost the server a bounded amount and must not
//! make it lie, open up, or forge its logs.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use common::*;

/// The server's reply to raw bytes on a fresh connection, read until it closes or `wait` ends.
fn raw_exchange(s: &Server, request: &[u8], wait: Duration) -> String {
    let addr = s.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn api_keys_asked_for_but_empty_are_a_start_up_error() {
    let dir = TempDir::new("keys");
    let empty = dir.path().join("keys.txt");
    std::fs::write(&empty, "# no keys yet\n\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_aiaas"))
            .args(["--host", "127.0.0.1", "--port", "0", "--models"])
            .arg(models_dir())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let (code, text) = run(&["--api-keys-file", empty.to_str().unwrap()], &[]);
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains(empty.to_str().unwrap()) && text.contains("no keys"),
        "{text}"
    );
    assert!(!text.contains("listening on"), "it must not serve: {text}");
    let (code, text) = run(&[], &[("AIAAS_API_KEYS", " , ")]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("AIAAS_API_KEYS"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invented_methods_and_paths_create_no_metric_series() {
    let s = Server::start(&models_dir(), &["--load-model", "regressor"]);
    s.wait_ready();
    let c = client();
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("aiaas_http_"))
            .count()
    };
    let hostile = |i: usize| {
        let c = c.clone();
        let invented = s.url(&format!("/v1/models/r{i}/x{i}"));
        let random = s.url(&format!("/random/{i}/path"));
        async move {
            let method = format!("M{i:X}Q");
            let r = send(c.request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                invented,
            ))
            .await;
            assert!(r.status >= 400);
            let r = send(c.get(random)).await;
            assert_eq!(r.status, 404);
        }
    };
    // one round first (and a scrape), so that the label sets these requests may legitimately
    // add exist before counting
    hostile(0).await;
    let _ = get(&c, &s.url("/metrics")).await;
    let before = series(&get(&c, &s.url("/metrics")).await.text());
    for i in 1..1500 {
        hostile(i).await;
    }
    let metrics = get(&c, &s.url("/metrics")).await.text();
    let after = series(&metrics);
    assert_eq!(before, after, "series grew from {before} to {after}");
    assert!(
        metrics.contains("method=\"other\""),
        "unknown methods are one label"
    );
    assert!(!metrics.contains("M5DCQ"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_text_cannot_forge_log_lines_and_odd_request_ids_are_replaced() {
    let s = Server::start(&models_dir(), &["--load-model", "regressor"]);
    s.wait_ready();
    let c = client();
    // a model name with a newline and ANSI escapes, percent-encoded in the path
    let r = post_json(
        &c,
        &s.url("/v1/models/x%0a2026-12-03T00:00:00Z%20ERROR%20forged%1b%5b31m/predict"),
        &json!({"instances": [[0.5]]}),
    )
    .await;
    assert!(r.status == 404 || r.status == 400, "{}", r.status);
    assert!(s.wait_log("/v1/models/{name}/predict 4"));
    let log = s.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-03T00:00:00Z")),
        "a forged line:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "raw escape codes in the log");

    // request ids: a sane one is echoed; quotes, control bytes or 200 characters are replaced
    let echoed = |id: &str| {
        let c = c.clone();
        let url = s.url("/v1/models");
        let id = id.to_string();
        async move {
            send(c.get(url).header("x-request-id", id))
                .await
                .header("x-request-id")
                .map(String::from)
        }
    };
    assert_eq!(
        echoed("trace-0af7651916cd43dd").await.as_deref(),
        Some("trace-0af7651916cd43dd")
    );
    for bad in ["a\"b", "a b", &"x".repeat(200)] {
        let got = echoed(bad).await.expect("a request id is always answered");
        assert_ne!(got, bad);
        assert_eq!(got.len(), 36, "a fresh UUID instead of {bad:?}: {got}");
    }
    assert!(!s.log_text().contains(&"x".repeat(200)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_is_json_and_oversized_bodies_are_refused_before_reading() {
    let s = Server::start(
        &models_dir(),
        &["--load-model", "regressor", "--max-body-bytes", "100000"],
    );
    s.wait_ready();
    let c = client();
    // an encoding the server cannot decode: 415, in the error shape
    let r = send(
        c.post(s.url("/v1/models/regressor/predict"))
            .header("content-type", "application/json")
            .header("content-encoding", "br")
            .body("xx"),
    )
    .await;
    assert_eq!(r.status, 415);
    assert_eq!(r.error_code(), "unsupported_media_type");
    let r = send(
        c.post(s.url("/v2/models/regressor/infer"))
            .header("content-encoding", "zstd-nope")
            .body("xx"),
    )
    .await;
    // v2 answers every client error 400, as Triton does
    assert_eq!(r.status, 400);
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("Content-Encoding"),
        "v2's shape: {message}"
    );
    // a path that is not UTF-8 once decoded
    let r = send(c.get(s.url("/v1/models/%ff"))).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(!r.error_code().is_empty());

    // a declared length over the limit: 413 at once, no 100 Continue, nothing read
    let reply = raw_exchange(
        &s,
        b"POST /v1/models/regressor/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5000000000\r\nexpect: 100-continue\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(!reply.contains("100 Continue"), "{reply}");
    assert!(reply.contains("payload_too_large"), "{reply}");
    let reply = raw_exchange(
        &s,
        b"POST /v2/models/regressor/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100001\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
}

/// Whether the server has closed `stream` (a read returns end of file or an error) within
/// `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn stalled_connections_are_closed_and_probes_get_through_past_the_cap() {
    let s = Server::start(
        &models_dir(),
        &[
            "--load-model",
            "regressor",
            "--max-connections",
            "16",
            "--header-timeout",
            "1.5",
        ],
    );
    s.wait_ready();
    let addr = s.base.trim_start_matches("http://").to_string();
    // 16 connections that send nothing, 8 with half a request head, 8 idle after one request:
    // more than the cap
    let mut silent: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut half: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut t = TcpStream::connect(&addr).unwrap();
            t.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .unwrap();
            t
        })
        .collect();
    let mut idle: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut t = TcpStream::connect(&addr).unwrap();
            t.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            t
        })
        .collect();
    // a probe still gets through while they are held (the overflow's short timeout)
    let started = std::time::Instant::now();
    let probe = raw_exchange(
        &s,
        b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // every stalled connection is closed by the server after the header timeout
    for (what, conns) in [("silent", &mut silent), ("half-sent head", &mut half)] {
        for t in conns.iter_mut() {
            assert!(
                closed_within(t, Duration::from_secs(5)),
                "a {what} connection stayed open"
            );
        }
    }
    for t in idle.iter_mut() {
        // its answer first, then the close
        assert!(
            closed_within(t, Duration::from_secs(5)),
            "an idle keep-alive connection stayed open"
        );
    }
    let reply = raw_exchange(
        &s,
        b"GET /health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
}

#[test]
fn a_stalled_body_is_answered_408_and_its_connection_closed() {
    let s = Server::start(
        &models_dir(),
        &["--load-model", "regressor", "--body-timeout", "1"],
    );
    s.wait_ready();
    let started = std::time::Instant::now();
    let reply = raw_exchange(
        &s,
        b"POST /v1/models/regressor/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"instances\": ",
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_silently_wrong_answers_for_values_a_model_cannot_take_or_give() {
    let s = Server::start(&models_dir(), &["--load-model", "regressor,image-cnn"]);
    s.wait_ready();
    let c = client();
    let v1 = s.url("/v1/models/regressor/predict");
    // out of FP32's range, or not a number at all: 422 naming what is wrong, never `null`
    for (instances, needle) in [
        (json!([1e39]), "outside FP32"),
        (json!([[3.5e38]]), "outside FP32"),
        (json!([1e308]), "outside FP32"),
        (json!([true]), "boolean"),
        (json!([[false]]), "boolean"),
    ] {
        let r = post_json(&c, &v1, &json!({ "instances": instances })).await;
        assert_eq!(r.status, 422, "{instances}: {}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{instances}: {message}");
    }
    // in range, but the model's answer overflows: y = 3.06 x + 0.46 is infinite for x = 3e38
    let r = post_json(&c, &v1, &json!({"instances": [[0.5], [3e38]]})).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("instance 1") && message.contains("not finite"),
        "{message}"
    );
    // v2: out-of-range inputs are refused; non-finite outputs are Triton's literals
    let v2 = s.url("/v2/models/regressor/infer");
    let r = post_json(
        &c,
        &v2,
        &json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1e39]}]}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("outside FP32"), "{}", r.text());
    let r = post_json(
        &c,
        &v2,
        &json!({"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [0.5, 3e38]}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.contains("Infinity]"), "{text}");
    assert!(!text.contains("null"), "{text}");
    // and takes them in its inputs, as Triton's load generator sends them
    let r = send(
        c.post(&v2).header("content-type", "application/json").body(
            r#"{"inputs": [{"name": "x", "shape": [3, 1], "datatype": "FP32", "data": [NaN, 0.5, -Infinity]}]}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("[NaN,"), "{}", r.text());
    assert!(r.text().contains("-Infinity]"), "{}", r.text());

    // the first half of a JPEG is malformed, not a confident label
    let jpeg = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/triangle.jpg"),
    )
    .unwrap();
    let image = s.url("/v1/models/image-cnn/predict");
    let r = send(
        c.post(&image)
            .header("content-type", "image/jpeg")
            .body(jpeg.clone()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        c.post(&image)
            .header("content-type", "image/jpeg")
            .body(jpeg[..jpeg.len() / 2].to_vec()),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("truncated"), "{}", r.text());
}

/// A PNG of `w` x `h` noisy pixels (so it does not compress to nothing).
fn noisy_png(w: u32, h: u32) -> Vec<u8> {
    let mut seed = 12345u32;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let b = (seed >> 16) as u8;
        image::Rgb([b, b / 2, 255 - b])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_pixels_are_bounded_per_image_and_in_flight() {
    let s = Server::start(
        &models_dir(),
        &[
            "--load-model",
            "image-cnn",
            "--max-image-pixels",
            "1000000",
            "--decode-budget-mib",
            "4",
        ],
    );
    s.wait_ready();
    let c = client();
    let url = s.url("/v1/models/image-cnn/predict");
    let r = send(
        c.post(&url)
            .header("content-type", "image/png")
            .body(noisy_png(1200, 1000)),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("--max-image-pixels"), "{}", r.text());
    // 12 images of 0.9 MP (5.4 MB decoded each with their converted copy) against a 4 MiB
    // budget: they take turns, one at a time, and every one is answered
    let png = noisy_png(1000, 900);
    let replies = futures::future::join_all((0..12).map(|_| {
        send(
            c.post(&url)
                .header("content-type", "image/png")
                .body(png.clone()),
        )
    }))
    .await;
    for r in replies {
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_member_gzip_body_is_read_whole() {
    use std::io::Write as _;
    let s = Server::start(&models_dir(), &["--load-model", "regressor"]);
    s.wait_ready();
    let c = client();
    let gzip = |text: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    // two gzip members, as `cat a.gz b.gz` makes: one stream by RFC 1952
    let mut body = gzip(r#"{"instances": [[0.5]"#);
    body.extend(gzip(r#", [0.7]]}"#));
    let r = send(
        c.post(s.url("/v1/models/regressor/predict"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["predictions"].as_array().unwrap().len(), 2);
}

/// CPU seconds the process has used (user + system, from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // fields after the command name, which is in parentheses
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoding_stops_when_the_deadline_passes_or_the_client_leaves() {
    let s = Server::start(&models_dir(), &["--load-model", "text-classifier"]);
    s.wait_ready();
    let url = s.url("/v1/models/text-classifier/predict");
    // 512 texts of 20,000 characters: several seconds of tokenising on two cores
    let text = "我爱你 this is great ".repeat(1000);
    let body = serde_json::to_vec(&json!({ "instances": vec![text; 512] })).unwrap();
    let c = client();
    let started = std::time::Instant::now();
    let r = send(
        c.post(&url)
            .header("content-type", "application/json")
            .header("x-request-timeout-ms", "100")
            .body(body.clone()),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.text().contains("while it was being decoded"),
        "{}",
        r.text()
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // a client that hangs up: the server stops within a text or two, not after all 512
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let r = impatient
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    let before = cpu_seconds(s.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = cpu_seconds(s.pid()) - before;
    eprintln!("CPU seconds spent in the 3 s after the client left: {spent:.2}");
    assert!(
        spent < 1.0,
        "the server kept working for nobody: {spent:.2} CPU s"
    );
}

#[test]
fn stalled_connections_do_not_hold_the_shutdown() {
    let mut s = Server::start(&models_dir(), &["--load-model", "regressor"]);
    s.wait_ready();
    let addr = s.base.trim_start_matches("http://").to_string();
    let _silent = TcpStream::connect(&addr).unwrap();
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .unwrap();
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    s.signal("TERM");
    let code = s.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0));
    // a second's grace for each, not the header timeout (15 s) nor --shutdown-timeout (30 s)
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        started.elapsed()
    );
}
