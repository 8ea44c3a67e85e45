//! Benchmark helper: raw TorchScript forward throughput through the engine (no server, no HTTP),
//! and request bodies for the HTTP load generator. Driven by `bench/run.py`.

// the benchmark draws shapes, it does not train on them: public, so the training half is not
// reported unused here
#[path = "../src/bin/aiaas-train/demo.rs"]
pub mod demo;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rand::SeedableRng;

use aiaas::codec::{ImageLimits, ModelCodec};
use aiaas::config::model_spec::{Placed, Precision};
use aiaas::engine::torch::{EngineOptions, TorchEngine};
use aiaas::engine::Engine;
use aiaas::registry::spec::load_spec;
use demo::Shape;

#[derive(Debug, Parser)]
#[command(
    name = "aiaas-bench",
    about = "Raw forward throughput and request bodies for the benchmark"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward passes straight through the engine: one JSON line per batch size.
    Raw(RawArgs),
    /// Posts one body over N keep-alive connections for a while (HTTP/1.1, loopback; what the
    /// GPU check uses where no load generator is installed); prints one JSON line.
    Load {
        /// Full URL, e.g. http://127.0.0.1:8080/v1/models/image-cnn/predict.
        #[arg(long)]
        url: String,
        /// The request body.
        #[arg(long)]
        body: PathBuf,
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// Connections, each sending its next request when the last is answered.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Writes a PNG of a shape (the body the load generator posts).
    Png {
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a /v1 JSON body with one image as 64x64x3 pixel values.
    JsonPixels {
        #[arg(long)]
        out: PathBuf,
    },
    /// Times decoding a request body through a model's codec (no HTTP, no forward): a PNG or
    /// JPEG body as the image route decodes it, anything else as a /v1 JSON body.
    Decode {
        #[arg(long, default_value = "models/image-cnn")]
        model: PathBuf,
        #[arg(long)]
        body: PathBuf,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

/// What `raw` measures and how the engines run.
#[derive(Debug, clap::Args)]
struct RawArgs {
    /// Model folder (with model.toml).
    #[arg(long, default_value = "models/image-cnn")]
    model: PathBuf,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Engine instances running side by side, each on its own thread.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// libtorch intra-op threads per instance (0 = cores / instances, as the server does).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Each pass takes a random batch size from 1 to the given one, as served batches do.
    #[arg(long)]
    vary: bool,
    /// Where the engines run: `cpu` or a CUDA device number.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, fp16 or bf16 (default: the model's `precision`).
    #[arg(long)]
    precision: Option<String>,
    /// Tokens per text (text models' variable length).
    #[arg(long, default_value_t = 16)]
    seq_len: usize,
}

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Raw(args) => raw(&args),
        Command::Load {
            url,
            body,
            content_type,
            concurrency,
            seconds,
        } => load(&url, &body, &content_type, concurrency, seconds),
        Command::Png { out } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            std::fs::write(&out, demo::png(&demo::draw(Shape::Triangle, 64, &mut rng)))
                .with_context(|| format!("writing {}", out.display()))
        }
        Command::JsonPixels { out } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let img = demo::draw(Shape::Triangle, 64, &mut rng);
            let pixels: Vec<u8> = img.pixels().flat_map(|p| p.0).collect();
            let body = serde_json::json!({"instances": [pixels]});
            std::fs::write(&out, serde_json::to_vec(&body)?)
                .with_context(|| format!("writing {}", out.display()))
        }
        Command::Decode {
            model,
            body,
            seconds,
        } => decode(&model, &body, seconds),
    }
}

/// Decodes `body` through the model's codec for `seconds`; prints one JSON line.
fn decode(dir: &std::path::Path, body: &std::path::Path, seconds: f64) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let spec = load_spec(name, &dir.join("model.toml"), dir)?;
    let codec = ModelCodec::new(&spec, ImageLimits::default(), 0).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(body).with_context(|| format!("reading {}", body.display()))?;
    let image = bytes.starts_with(b"\x89PNG") || bytes.starts_with(&[0xff, 0xd8]);
    let once = || -> Result<usize> {
        if image {
            Ok(codec.decode_encoded(&bytes)?.rows())
        } else {
            let req = aiaas::codec::v1::parse_request(&bytes)?;
            let mut rows = 0;
            for i in &req.instances {
                rows += codec.decode_instance(i)?.rows();
            }
            Ok(rows)
        }
    };
    let (mut n, started) = (0u64, Instant::now());
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        std::hint::black_box(once()?);
        n += 1;
    }
    let per = started.elapsed().as_secs_f64() / n as f64;
    println!(
        "{}",
        serde_json::json!({"body": body.display().to_string(), "bytes": bytes.len(),
                           "iterations": n, "us_per_decode": per * 1e6})
    );
    Ok(())
}

/// Runs `instances` engines side by side for `seconds` per batch size; prints one JSON line each.
fn raw(args: &RawArgs) -> Result<()> {
    let RawArgs {
        model: ref dir,
        batch: ref batches,
        seconds,
        instances,
        threads,
        vary,
        ref device,
        ref precision,
        seq_len,
    } = *args;
    let device = match device.as_str() {
        "cpu" => Placed::Cpu,
        n => Placed::Cuda(n.trim_start_matches("cuda:").parse()?),
    };
    let precision: Option<Precision> = precision
        .as_ref()
        .map(|p| serde_json::from_value(serde_json::json!(p)))
        .transpose()?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let spec = load_spec(name, &dir.join("model.toml"), dir)?;
    let codec = ModelCodec::new(&spec, ImageLimits::default(), 0).map_err(anyhow::Error::msg)?;
    let device = device.into();
    let precision = precision.unwrap_or(spec.precision);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if threads > 0 {
        threads
    } else {
        (cores / instances).max(1)
    };
    // as the server runs it
    let channels_last = spec.channels_last();
    for &b in batches {
        let sizes: Vec<usize> = if vary { (1..=b).collect() } else { vec![b] };
        let inputs: Vec<_> = sizes
            .iter()
            .map(|&n| codec.warmup_item(n, seq_len).inputs)
            .collect();
        let workers: Vec<_> = (0..instances)
            .map(|k| {
                let inputs = inputs.clone();
                let file = spec.file.clone();
                let output_dtypes: Vec<_> = spec.outputs.iter().map(|o| o.datatype).collect();
                std::thread::spawn(move || -> Result<(usize, Vec<Duration>)> {
                    let options = EngineOptions {
                        intra_op_threads: Some(threads),
                        channels_last,
                        precision,
                        output_dtypes,
                    };
                    let mut engine = TorchEngine::load(&file, device, options)?;
                    for input in inputs.iter().take(3) {
                        engine.forward(input.clone())?;
                    }
                    let mut rng = rand::rngs::StdRng::seed_from_u64(k as u64);
                    let (mut items, mut latencies) = (0, Vec::new());
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs_f64(seconds) {
                        let input = &inputs[rand::Rng::random_range(&mut rng, 0..inputs.len())];
                        let t = Instant::now();
                        engine.forward(input.clone())?;
                        latencies.push(t.elapsed());
                        items += input[0].rows();
                    }
                    Ok((items, latencies))
                })
            })
            .collect();
        let (mut items, mut latencies) = (0, Vec::new());
        for w in workers {
            let (n, l) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
            items += n;
            latencies.extend(l);
        }
        latencies.sort();
        let p50 = latencies[latencies.len() / 2].as_secs_f64() * 1e3;
        let throughput = items as f64 / seconds;
        println!(
            "{}",
            serde_json::json!({
                "batch": b,
                "vary": vary,
                "instances": instances,
                "threads": threads,
                "device": device.to_string(),
                "precision": precision.to_string(),
                "iterations": latencies.len(),
                "items_per_s": throughput,
                "p50_ms": p50,
            })
        );
    }
    Ok(())
}

/// `concurrency` keep-alive connections post `body` to `url` for `seconds`.
fn load(
    url: &str,
    body: &std::path::Path,
    content_type: &str,
    concurrency: usize,
    seconds: f64,
) -> Result<()> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let body = std::fs::read(body).with_context(|| format!("reading {}", body.display()))?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let request = std::sync::Arc::new(request);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (host, request) = (host.to_string(), request.clone());
            std::thread::spawn(move || -> (Vec<Duration>, u64) {
                let (mut latencies, mut failed) = (Vec::new(), 0u64);
                let mut conn: Option<std::io::BufReader<std::net::TcpStream>> = None;
                while Instant::now() < deadline {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match std::net::TcpStream::connect(&host) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                conn.insert(std::io::BufReader::new(s))
                            }
                            Err(_) => {
                                failed += 1;
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        },
                    };
                    let t = Instant::now();
                    match exchange(c, &request) {
                        Ok(200) => latencies.push(t.elapsed()),
                        Ok(_) => failed += 1,
                        Err(_) => {
                            failed += 1;
                            conn = None;
                        }
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0);
    for w in workers {
        let (l, f) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
        latencies.extend(l);
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{}",
        serde_json::json!({
            "url": url, "concurrency": concurrency, "seconds": elapsed,
            "ok": latencies.len(), "failed": failed,
            "requests_per_s": latencies.len() as f64 / elapsed,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        })
    );
    Ok(())
}

/// Sends one request on a keep-alive connection and reads its answer; returns the status.
fn exchange(c: &mut std::io::BufReader<std::net::TcpStream>, request: &[u8]) -> Result<u16> {
    use std::io::{BufRead, Read, Write};
    c.get_mut().write_all(request)?;
    let mut line = String::new();
    c.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let mut length = 0usize;
    loop {
        line.clear();
        if c.read_line(&mut line)? == 0 {
            anyhow::bail!("connection closed");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    c.read_exact(&mut body)?;
    Ok(status)
}
