//! Quantized weights against fp32 on the real SmolLM2 (`make llm-fixtures`): perplexity on a
//! fixed text (tests/fixtures/quantization/text.txt) and greedy agreement with fp32 over a
//! fixed prompt set. The bounds are the measured figures with room for float noise across
//! CPUs (docs/MODELS.md has the table): a broken packing or scale layout gives perplexities
//! in the hundreds or thousands and no agreement at all. Run with `--nocapture` for the
//! figures.

use std::path::{Path, PathBuf};

use aiaas::config::model_spec::Precision;
use aiaas::engine::{
    DecodeInput, Decoder, DecoderOptions, PrefillInput, Quantization, TorchDecoder,
};
pub mod common;

use common::decoding::{greedy, pool_of};

/// The text is scored as this many pieces side by side (one decode step scores a token of
/// each), every piece from its own start.
const PIECES: usize = 8;
/// Tokens of each greedy answer.
const ANSWER: usize = 32;

const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "A good way to learn a new language is",
    "def fibonacci(n):\n",
    "The first day of the week is",
    "Photosynthesis is the process by which",
    "My favourite season is autumn because",
    "The quick brown fox",
    "In 1969, the first person to walk on the Moon was",
    "Dear Sir or Madam, I am writing to",
    "The best advice I ever received was",
    "Here is a list of fruits: apple, banana,",
];

fn checkpoint() -> PathBuf {
    let dir = std::env::var_os("AIAAS_LLM_FIXTURES")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join(".fixtures/llm"),
            PathBuf::from,
        )
        .join("smollm2-135m-instruct");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing: run `make llm-fixtures`",
        dir.display()
    );
    dir
}

fn load(dir: &Path, quantization: Option<Quantization>) -> TorchDecoder {
    let options = DecoderOptions {
        precision: Precision::Fp32,
        kv_blocks: 128,
        quantization,
        ..DecoderOptions::default()
    };
    TorchDecoder::load(dir, options).unwrap_or_else(|e| panic!("{quantization:?}: {e}"))
}

fn tokenize(dir: &Path, text: &str) -> Vec<u32> {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// `-log p(token)` under `logits`, in f64.
fn nll(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - logits[token as usize] as f64
}

/// The text's perplexity: its tokens cut into [`PIECES`] pieces, each fed token by token
/// (teacher forcing), every token after a piece's first scored.
fn perplexity(decoder: &mut TorchDecoder, tokens: &[u32]) -> f64 {
    let len = tokens.len() / PIECES;
    let pieces: Vec<&[u32]> = tokens.chunks_exact(len).take(PIECES).collect();
    let mut blocks = pool_of(&decoder.kv());
    let mut tables = vec![Vec::new(); PIECES];
    for table in &mut tables {
        blocks.reserve(table, len).unwrap();
    }
    let inputs: Vec<PrefillInput> = pieces
        .iter()
        .zip(&tables)
        .map(|(p, t)| PrefillInput {
            tokens: &p[..1],
            start: 0,
            blocks: t,
        })
        .collect();
    let mut logits = decoder.prefill(&inputs).unwrap();
    let (mut total, mut scored) = (0.0, 0usize);
    for position in 1..len {
        for (l, p) in logits.iter().zip(&pieces) {
            total += nll(l, p[position]);
            scored += 1;
        }
        if position + 1 == len {
            break;
        }
        let inputs: Vec<DecodeInput> = pieces
            .iter()
            .zip(&tables)
            .map(|(p, t)| DecodeInput {
                token: p[position],
                position,
                blocks: t,
            })
            .collect();
        logits = decoder.decode(&inputs).unwrap();
    }
    for table in &mut tables {
        blocks.release(table);
    }
    (total / scored as f64).exp()
}

/// Each prompt's greedy answer of [`ANSWER`] tokens, all prompts in the same steps.
fn greedy_answers(decoder: &mut TorchDecoder, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut blocks = pool_of(&decoder.kv());
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    greedy(decoder, &mut blocks, &prompts, ANSWER).0
}

/// Against fp32's answers: the fraction of prompts answered identically, and the mean count
/// of leading tokens equal to fp32's.
fn agreement(answers: &[Vec<u32>], reference: &[Vec<u32>]) -> (f64, f64) {
    let n = answers.len() as f64;
    let same = answers
        .iter()
        .zip(reference)
        .filter(|(a, r)| a == r)
        .count() as f64;
    let prefix: usize = answers
        .iter()
        .zip(reference)
        .map(|(a, r)| a.iter().zip(r).take_while(|(x, y)| x == y).count())
        .sum();
    (same / n, prefix as f64 / n)
}

struct Figures {
    perplexity: f64,
    identical: f64,
    prefix: f64,
}

fn measure(
    dir: &Path,
    q: Option<Quantization>,
    text: &[u32],
    prompts: &[Vec<u32>],
) -> (f64, Vec<Vec<u32>>) {
    let mut decoder = load(dir, q);
    (
        perplexity(&mut decoder, text),
        greedy_answers(&mut decoder, prompts),
    )
}

#[test]
fn quantized_smollm2_stays_near_fp32() {
    let started = std::time::Instant::now();
    let dir = checkpoint();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quantization/text.txt"),
    )
    .unwrap();
    let text = tokenize(&dir, &text);
    assert!(text.len() >= PIECES * 64, "{} tokens", text.len());
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tokenize(&dir, p)).collect();
    let (fp32_ppl, fp32_answers) = measure(&dir, None, &text, &prompts);
    let figures = |q: Quantization| {
        let (perplexity, answers) = measure(&dir, Some(q), &text, &prompts);
        let (identical, prefix) = agreement(&answers, &fp32_answers);
        Figures {
            perplexity,
            identical,
            prefix,
        }
    };
    let int8 = figures(Quantization::Int8);
    let int4 = figures(Quantization::Int4 { group_size: 32 });
    println!(
        "SmolLM2-135M, {} tokens in {PIECES} pieces; {} prompts x {ANSWER} tokens",
        text.len(),
        PROMPTS.len()
    );
    println!("fp32: perplexity {fp32_ppl:.3}");
    for (name, f) in [("int8", &int8), ("int4 g32", &int4)] {
        println!(
            "{name}: perplexity {:.3} ({:+.2}%), identical answers {:.3}, mean matching prefix {:.1}/{ANSWER}",
            f.perplexity,
            (f.perplexity / fp32_ppl - 1.0) * 100.0,
            f.identical,
            f.prefix
        );
    }
    println!("({:.0} s)", started.elapsed().as_secs_f64());
    // the real model on plain English: a sane perplexity to start from
    assert!(
        fp32_ppl > 2.0 && fp32_ppl < 40.0,
        "fp32 perplexity {fp32_ppl}"
    );
    // measured (x86-64, AVX-512): int8 +0.9%, int4 -0.2%; groups of 64 gave +34%
    assert!(
        int8.perplexity < fp32_ppl * 1.02,
        "int8 perplexity {} against fp32's {fp32_ppl}",
        int8.perplexity
    );
    assert!(
        int4.perplexity < fp32_ppl * 1.05,
        "int4 perplexity {} against fp32's {fp32_ppl}",
        int4.perplexity
    );
    // measured: int8 5/16 identical, 18.3 tokens matching; int4 10/16, 25.6. Greedy answers
    // of a 135M model fork at near ties, so a small rounding sends some elsewhere; a broken
    // layer agrees on none
    for (name, f) in [("int8", &int8), ("int4", &int4)] {
        assert!(
            f.identical >= 0.25,
            "{name}: identical answers {}",
            f.identical
        );
        assert!(
            f.prefix >= 12.0,
            "{name}: mean matching prefix {}",
            f.prefix
        );
    }
}
