//! The generative decoder's step time, engine only (no server, no scheduler): loads
//! SmolLM2-135M-Instruct from `.fixtures/llm` (or the folder given as the first argument),
//! prefills each batch's sequences (prompts of 90-110 tokens, several to a call up to 512
//! tokens, as the scheduler's steps), then times decode steps of the
//! whole batch, argmax included, and prints ms/step and output tokens/s per batch size.
//!
//! `cargo run --release --example decoder-bench [-- DIR]`; `AIAAS_BENCH_PRECISION=bf16`,
//! `AIAAS_BENCH_THREADS` (2), `AIAAS_BENCH_BATCHES` ("1,4,16,64"), `AIAAS_BENCH_STEPS` (50),
//! `AIAAS_BENCH_QUANTIZATION` ("int8", "int4" with groups of 32, "int4-64"; default none).

use std::path::PathBuf;
use std::time::Instant;

use aiaas::config::model_spec::Precision;
use aiaas::engine::{DecodeInput, Decoder, DecoderOptions, Quantization, TorchDecoder};
// the tests' decoder helpers (its greedy loop is theirs; this times its own)
#[allow(dead_code)]
#[path = "../tests/common/decoding.rs"]
mod decoding;

use decoding::{argmax, pool_of};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let dir = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".fixtures/llm/smollm2-135m-instruct"),
        PathBuf::from,
    );
    let precision = match env_or("AIAAS_BENCH_PRECISION", "fp32").as_str() {
        "bf16" => Precision::Bf16,
        _ => Precision::Fp32,
    };
    let threads: usize = env_or("AIAAS_BENCH_THREADS", "2").parse().unwrap();
    let steps: usize = env_or("AIAAS_BENCH_STEPS", "50").parse().unwrap();
    let batches: Vec<usize> = env_or("AIAAS_BENCH_BATCHES", "1,4,16,64")
        .split(',')
        .map(|b| b.trim().parse().unwrap())
        .collect();
    let quantization = match env_or("AIAAS_BENCH_QUANTIZATION", "none").as_str() {
        "int8" => Some(Quantization::Int8),
        "int4" => Some(Quantization::Int4 { group_size: 32 }),
        "int4-64" => Some(Quantization::Int4 { group_size: 64 }),
        _ => None,
    };
    let options = DecoderOptions {
        precision,
        quantization,
        kv_blocks: 1024,
        intra_op_threads: Some(threads),
        ..DecoderOptions::default()
    };
    let mut decoder = TorchDecoder::load(&dir, options).unwrap();
    let vocab = decoder.config().vocab_size as u32;
    println!("{precision:?} {quantization:?}, {threads} threads, {steps} decode steps after ~100-token prompts");
    for &batch in &batches {
        let mut blocks = pool_of(&decoder.kv());
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|s| {
                let len = 90 + (s * 7) % 21;
                (0..len)
                    .map(|i| ((s * 7919 + i * 104_729) as u32 % (vocab - 100)) + 50)
                    .collect()
            })
            .collect();
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); batch];
        // the prompts prefilled as the scheduler does by default: several to a step, up to
        // 512 tokens (max_step_tokens) in all
        let started = Instant::now();
        let mut last: Vec<u32> = Vec::with_capacity(batch);
        let mut next = 0;
        while next < batch {
            let mut end = next + 1;
            let mut tokens = prompts[next].len();
            while end < batch && tokens + prompts[end].len() <= 512 {
                tokens += prompts[end].len();
                end += 1;
            }
            for (p, table) in prompts[next..end].iter().zip(&mut tables[next..end]) {
                blocks.reserve(table, p.len()).unwrap();
            }
            let inputs: Vec<aiaas::engine::PrefillInput> = prompts[next..end]
                .iter()
                .zip(&tables[next..end])
                .map(|(p, table)| aiaas::engine::PrefillInput {
                    tokens: p,
                    start: 0,
                    blocks: table,
                })
                .collect();
            last.extend(decoder.prefill(&inputs).unwrap().iter().map(|l| argmax(l)));
            next = end;
        }
        let prefill = started.elapsed();
        let mut times = Vec::with_capacity(steps);
        for step in 0..steps {
            for (table, p) in tables.iter_mut().zip(&prompts) {
                blocks.reserve(table, p.len() + step + 1).unwrap();
            }
            let inputs: Vec<DecodeInput> = prompts
                .iter()
                .zip(&tables)
                .zip(&last)
                .map(|((p, t), &token)| DecodeInput {
                    token,
                    position: p.len() + step,
                    blocks: t,
                })
                .collect();
            let t = Instant::now();
            let logits = decoder.decode(&inputs).unwrap();
            last = logits.iter().map(|l| argmax(l)).collect();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let total: f64 = times.iter().sum();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "batch {batch:>3}: {median:7.2} ms/step median ({:7.2} mean), {:7.1} tok/s median, {:7.1} tok/s overall; prefill {:.2} s ({:.0} prompt tok/s)",
            total / steps as f64,
            batch as f64 * 1e3 / median,
            (batch * steps) as f64 * 1e3 / total,
            prefill.as_secs_f64(),
            prompts.iter().map(Vec::len).sum::<usize>() as f64 / prefill.as_secs_f64()
        );
        for table in &mut tables {
            blocks.release(table);
        }
    }
}
