//! Test support: a real `aiaas` process on an ephemeral port, temporary repositories, and
//! reqwest helpers.
//!
//! Test files declare it `pub mod common;`. Each test binary compiles this module anew
//! and calls a part of it; declared `pub`, its public items are the binary's API rather than
//! dead code where that binary does not call them, while private ones are still checked.

pub mod decoding;
/// The demo shapes generator the trainer uses, for fresh images to classify.
#[path = "../../src/bin/aiaas-train/demo.rs"]
pub mod demo;
pub mod hf;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bundled model repository.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// A running server; killed on drop. Its log lines are kept for assertions.
pub struct Server {
    child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Copies the server's output into `log`; joined once the process has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `aiaas` on 127.0.0.1:0 with `args` and waits until it listens.
    pub fn start(models: &Path, args: &[&str]) -> Server {
        Server::start_with_env(models, args, &[])
    }

    /// As [`Server::start`], with extra environment variables for the server only.
    pub fn start_with_env(models: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_aiaas"))
            .args(["--host", "127.0.0.1", "--port", "0", "--models"])
            .arg(models)
            .args(args)
            .env("RUST_LOG", "info")
            // gRPC off unless a test asks for it (--grpc-port): servers run side by side
            .env("AIAAS_GRPC_PORT", "0")
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn aiaas");
        let stdout = child.stdout.take().expect("piped stdout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let addr = line.split("listening on ").nth(1).map(|rest| {
                        rest.chars()
                            .take_while(|c| c.is_ascii_hexdigit() || ".:[]".contains(*c))
                            .collect::<String>()
                    });
                    if let Some(addr) = addr {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr.to_string());
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            })
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server did not report its address");
        Server {
            child,
            base: format!("http://{addr}"),
            log,
            reader: Some(reader),
        }
    }

    /// Starts on the bundled models and waits for readiness.
    pub fn bundled() -> Server {
        let s = Server::start(&models_dir(), &[]);
        s.wait_ready();
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Waits until /health/ready answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if blocking_get(&self.url("/health/ready")).is_ok_and(|(status, _)| status == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server not ready in time; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Whether the log comes to hold `needle` within 10 s: lines reach it through a reader
    /// thread, a moment after the server wrote them (an HTTP answer can arrive first).
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    /// Waits for the process to exit and returns its status code; by then its whole log has
    /// been read.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking GET (status, body), usable inside or outside a tokio runtime: reqwest's blocking
/// client runs on a thread of its own.
pub fn blocking_get(url: &str) -> Result<(u16, String), String> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let r = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .and_then(|c| c.get(url).send())
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        Ok((status, r.text().map_err(|e| e.to_string())?))
    })
    .join()
    .map_err(|_| "GET thread panicked".to_string())?
}

/// Copies the bundled model repository (or some models of it) into a fresh temporary folder.
pub fn temp_repository(models: &[&str]) -> TempDir {
    let dir = TempDir::new("repo");
    for m in models {
        copy_dir(&models_dir().join(m), &dir.path().join(m));
    }
    dir
}

/// A repository with image-cnn on one instance and no batching: a queue builds quickly.
pub fn slow_image_repo() -> TempDir {
    let repo = temp_repository(&["image-cnn"]);
    edit_model_toml(&repo.path().join("image-cnn"), |t| {
        t["instances"] = 1.into();
        t["batching"]["max_batch_size"] = 1.into();
    });
    repo
}

/// Rewrites `<model>/model.toml` through `edit` (as parsed TOML; comments are not kept).
pub fn edit_model_toml(model: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let path = model.join("model.toml");
    let mut table: toml::Table = std::fs::read_to_string(&path)
        .unwrap()
        .parse()
        .expect("model.toml parses");
    edit(&mut table);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A temporary folder removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("aiaas-test-{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Asserts a JSON error body with a code and returns the message.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {v}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "no message in {v}"
        );
        code.to_string()
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.expect("request sent");
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.expect("body read"),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .unwrap()
}

pub async fn post_json(c: &reqwest::Client, url: &str, body: &serde_json::Value) -> Reply {
    send(c.post(url).json(body)).await
}

pub async fn get(c: &reqwest::Client, url: &str) -> Reply {
    send(c.get(url)).await
}
