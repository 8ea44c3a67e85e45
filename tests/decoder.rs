//! The generative decoder against transformers, on the checkpoints `make llm-fixtures` builds
//! (each with transformers' own logits and greedy tokens for a few prompts): last-position
//! logits within 1e-4 in fp32, greedy decoding token for token, the same tokens whichever
//! sequences share the steps, every KV block back after release, and an architecture the
//! decoder does not implement refused by name.

use std::path::{Path, PathBuf};

use aiaas::config::model_spec::Precision;
use aiaas::engine::{
    DecodeInput, Decoder, DecoderOptions, EngineError, Family, PrefillInput, TorchDecoder,
};
pub mod common;

use common::decoding::{greedy, pool_of};

/// Every checkpoint the fixtures hold, one per family and loading path.
const CHECKPOINTS: &[&str] = &[
    "smollm2-135m-instruct",
    "llama-gqa",
    "llama-tied",
    "mistral",
    "qwen2",
    "qwen3",
    "llama-sharded",
    "llama-no-arch",
];

/// transformers' answers for one prompt (tests/fixtures/llm/build.py describes the format).
#[derive(serde::Deserialize)]
struct Prompt {
    name: String,
    input_ids: Vec<u32>,
    /// The prompt's last-position logits, `[vocab]`.
    logits_last: LogitsFile,
    /// Every position's logits, `[positions, vocab]` (the short prompt only).
    logits_all: Option<LogitsFile>,
    /// `generate(do_sample=False, max_new_tokens=16)`'s new tokens (ending on eos where it
    /// stopped on one).
    greedy: Vec<u32>,
}

/// Raw little-endian f32, row-major, relative to the checkpoint's folder.
#[derive(serde::Deserialize)]
struct LogitsFile {
    file: String,
    shape: Vec<usize>,
    /// The five highest logits, `[id, logit]` (last-position files).
    #[serde(default)]
    top5: Vec<(u32, f32)>,
}

#[derive(serde::Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
}

/// The fixtures folder: `AIAAS_LLM_FIXTURES`, else `.fixtures/llm`.
fn fixtures() -> PathBuf {
    let dir = std::env::var_os("AIAAS_LLM_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(".fixtures/llm"),
        PathBuf::from,
    );
    let missing: Vec<&&str> = CHECKPOINTS
        .iter()
        .filter(|c| !dir.join(c).join("reference.json").is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "LLM fixtures {missing:?} missing in {}: run `make llm-fixtures`",
        dir.display()
    );
    dir
}

fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The file's logits, one row per position.
fn logits_file(dir: &Path, f: &LogitsFile) -> Vec<Vec<f32>> {
    let values: Vec<f32> = std::fs::read(dir.join(&f.file))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let vocab = *f.shape.last().unwrap();
    assert_eq!(
        values.len(),
        f.shape.iter().product::<usize>(),
        "{}",
        f.file
    );
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

fn last_logits(dir: &Path, prompt: &Prompt) -> Vec<f32> {
    logits_file(dir, &prompt.logits_last).remove(0)
}

fn load(dir: &Path, precision: Precision) -> TorchDecoder {
    let options = DecoderOptions {
        precision,
        kv_blocks: 64,
        ..DecoderOptions::default()
    };
    TorchDecoder::load(dir, options).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logits of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fp32_logits_and_greedy_tokens_are_transformers() {
    let root = fixtures();
    for name in CHECKPOINTS {
        let dir = root.join(name);
        let reference = reference(&dir);
        let mut decoder = load(&dir, Precision::Fp32);
        let mut blocks = pool_of(&decoder.kv());
        for prompt in &reference.prompts {
            let p = &prompt.name;
            let want = last_logits(&dir, prompt);
            let (tokens, logits) = greedy(
                &mut decoder,
                &mut blocks,
                &[&prompt.input_ids],
                prompt.greedy.len(),
            );
            let diff = max_abs_diff(&logits[0], &want);
            assert!(diff <= 1e-4, "{name} {p}: logits differ by {diff}");
            assert_eq!(tokens[0], prompt.greedy, "{name} {p}: greedy tokens");
        }
    }
}

/// The short prompt fed one token at a time (a prefill of its first token, then decode steps)
/// gives transformers' logits at every position.
#[test]
fn decoding_token_by_token_gives_every_position_of_transformers() {
    let root = fixtures();
    for name in ["smollm2-135m-instruct", "llama-gqa", "qwen2", "qwen3"] {
        let dir = root.join(name);
        let reference = reference(&dir);
        let prompt = reference
            .prompts
            .iter()
            .find(|p| p.logits_all.is_some())
            .unwrap_or_else(|| panic!("{name}: no prompt with every position's logits"));
        let want = logits_file(&dir, prompt.logits_all.as_ref().unwrap());
        let mut decoder = load(&dir, Precision::Fp32);
        let mut blocks = pool_of(&decoder.kv());
        let mut table = Vec::new();
        blocks.reserve(&mut table, prompt.input_ids.len()).unwrap();
        for (position, (&token, want)) in prompt.input_ids.iter().zip(&want).enumerate() {
            let logits = if position == 0 {
                decoder.prefill(&[PrefillInput {
                    tokens: &[token],
                    start: 0,
                    blocks: &table,
                }])
            } else {
                decoder.decode(&[DecodeInput {
                    token,
                    position,
                    blocks: &table,
                }])
            }
            .unwrap();
            let diff = max_abs_diff(&logits[0], want);
            assert!(
                diff <= 1e-4,
                "{name} position {position}: logits differ by {diff}"
            );
        }
        blocks.release(&mut table);
    }
}

/// Mistral with a sliding window of 4: in two layers the last position sees the last 7 tokens
/// only, so a long prompt ends on the logits of its last 7 tokens alone (rotary embeddings
/// depend on relative positions only), and not on the logits without a window.
#[test]
fn a_sliding_window_limits_what_the_last_position_sees() {
    let source = fixtures().join("mistral");
    let dir = std::env::temp_dir().join(format!("aiaas-mistral-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["sliding_window"] = 4.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let weights = "model.safetensors";
    let _ = std::fs::remove_file(dir.join(weights));
    std::os::unix::fs::symlink(source.join(weights), dir.join(weights)).unwrap();
    let mut decoder = load(&dir, Precision::Fp32);
    std::fs::remove_dir_all(&dir).unwrap();

    let reference = reference(&source);
    let prompt = reference
        .prompts
        .iter()
        .max_by_key(|p| p.input_ids.len())
        .unwrap();
    let ids = &prompt.input_ids;
    let mut blocks = pool_of(&decoder.kv());
    let (_, whole) = greedy(&mut decoder, &mut blocks, &[ids], 1);
    let (_, tail) = greedy(&mut decoder, &mut blocks, &[&ids[ids.len() - 7..]], 1);
    let diff = max_abs_diff(&whole[0], &tail[0]);
    assert!(diff <= 1e-4, "the last 7 tokens alone differ by {diff}");
    // the last token decoded after the rest: the decode step's window is the prompt's
    let mut table = Vec::new();
    blocks.reserve(&mut table, ids.len()).unwrap();
    let n = ids.len();
    let piece = |tokens, start| PrefillInput {
        tokens,
        start,
        blocks: &table,
    };
    decoder.prefill(&[piece(&ids[..n - 1], 0)]).unwrap();
    let decoded = decoder
        .decode(&[DecodeInput {
            token: ids[n - 1],
            position: n - 1,
            blocks: &table,
        }])
        .unwrap();
    let diff = max_abs_diff(&whole[0], &decoded[0]);
    assert!(diff <= 1e-4, "the last token decoded differs by {diff}");
    blocks.release(&mut table);
    let unwindowed = max_abs_diff(&whole[0], &last_logits(&source, prompt));
    assert!(
        unwindowed > 1e-2,
        "the window changed nothing ({unwindowed})"
    );
}

/// A prompt computed in two pieces (the second attending over the first's cached keys)
/// ends on the logits of the whole.
#[test]
fn a_prompt_in_pieces_ends_where_the_whole_prompt_does() {
    let root = fixtures();
    for name in ["llama-gqa", "mistral", "qwen3"] {
        let dir = root.join(name);
        let reference = reference(&dir);
        let prompt = reference
            .prompts
            .iter()
            .max_by_key(|p| p.input_ids.len())
            .unwrap();
        let ids = &prompt.input_ids;
        let mut decoder = load(&dir, Precision::Fp32);
        let mut blocks = pool_of(&decoder.kv());
        let mut table = Vec::new();
        blocks.reserve(&mut table, ids.len()).unwrap();
        let cut = ids.len() / 3;
        let piece = |tokens, start| PrefillInput {
            tokens,
            start,
            blocks: &table,
        };
        decoder.prefill(&[piece(&ids[..cut], 0)]).unwrap();
        let logits = decoder.prefill(&[piece(&ids[cut..], cut)]).unwrap();
        let diff = max_abs_diff(&logits[0], &last_logits(&dir, prompt));
        assert!(diff <= 1e-4, "{name}: logits differ by {diff}");
    }
}

/// One step mixing a whole prompt with sequences decoding their last prompt token (as the
/// scheduler's steps do), given in an order other than the one the decoder lays its rows out
/// in: each sequence gets its own logits, transformers'.
#[test]
fn a_step_mixing_prompts_and_decoding_gives_each_its_own_logits() {
    let dir = fixtures().join("llama-gqa");
    let reference = reference(&dir);
    let prompts: Vec<&Prompt> = reference.prompts.iter().take(3).collect();
    assert!(prompts.len() == 3 && prompts.iter().all(|p| p.input_ids.len() >= 2));
    let mut decoder = load(&dir, Precision::Fp32);
    let mut blocks = pool_of(&decoder.kv());
    let mut tables = vec![Vec::new(); 3];
    for (table, p) in tables.iter_mut().zip(&prompts) {
        blocks.reserve(table, p.input_ids.len()).unwrap();
    }
    for (table, p) in tables.iter().zip(&prompts).take(2) {
        let ids = &p.input_ids;
        decoder
            .prefill(&[PrefillInput {
                tokens: &ids[..ids.len() - 1],
                start: 0,
                blocks: table,
            }])
            .unwrap();
    }
    let last_token = |i: usize| {
        let ids = &prompts[i].input_ids;
        PrefillInput {
            tokens: &ids[ids.len() - 1..],
            start: ids.len() - 1,
            blocks: &tables[i],
        }
    };
    let whole = PrefillInput {
        tokens: &prompts[2].input_ids,
        start: 0,
        blocks: &tables[2],
    };
    let logits = decoder
        .prefill(&[last_token(0), whole, last_token(1)])
        .unwrap();
    for (got, i) in logits.iter().zip([0, 2, 1]) {
        let diff = max_abs_diff(got, &last_logits(&dir, prompts[i]));
        assert!(diff <= 1e-4, "prompt {i}: logits differ by {diff}");
    }
    for table in &mut tables {
        blocks.release(table);
    }
}

/// A sequence's greedy tokens alone and sharing its prefill and decode steps with two others
/// are the same; every block is free again once the sequences are released.
#[test]
fn batch_composition_changes_no_tokens_and_blocks_come_back() {
    let root = fixtures();
    for name in ["smollm2-135m-instruct", "llama-gqa", "qwen2"] {
        let dir = root.join(name);
        let reference = reference(&dir);
        let prompts: Vec<&[u32]> = reference.prompts.iter().map(|p| &p.input_ids[..]).collect();
        assert!(prompts.len() >= 3, "{name}: three prompts to batch");
        let mut decoder = load(&dir, Precision::Fp32);
        let mut blocks = pool_of(&decoder.kv());
        let total = blocks.available();
        let (alone, alone_logits) = greedy(&mut decoder, &mut blocks, &prompts[..1], 16);
        let (batched, batched_logits) = greedy(&mut decoder, &mut blocks, &prompts[..3], 16);
        assert_eq!(batched[0], alone[0], "{name}: tokens alone and batched");
        let diff = max_abs_diff(&alone_logits[0], &batched_logits[0]);
        assert!(diff <= 1e-4, "{name}: batched logits differ by {diff}");
        // transformers stopped where it generated eos
        for (p, tokens) in reference.prompts.iter().zip(&batched) {
            let n = p.greedy.len();
            assert_eq!(tokens[..n], p.greedy, "{name} {} batched", p.name);
        }
        assert_eq!(blocks.available(), total, "{name}: blocks not given back");
    }
}

/// bf16 weights and cache: the logits stay near fp32's (bf16 keeps 8 bits of mantissa) and
/// the top token is one of transformers' fp32 top five (near ties may swap).
#[test]
fn bf16_stays_near_the_fp32_reference() {
    let root = fixtures();
    for name in ["smollm2-135m-instruct", "qwen3"] {
        let dir = root.join(name);
        let reference = reference(&dir);
        let mut decoder = load(&dir, Precision::Bf16);
        let mut blocks = pool_of(&decoder.kv());
        for prompt in &reference.prompts {
            let p = &prompt.name;
            let want = last_logits(&dir, prompt);
            let (tokens, logits) = greedy(&mut decoder, &mut blocks, &[&prompt.input_ids], 1);
            let largest = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(&logits[0], &want);
            assert!(
                diff <= 0.1 * largest,
                "{name} {p}: bf16 logits differ by {diff} (largest {largest})"
            );
            let top5 = &prompt.logits_last.top5;
            assert!(
                top5.iter().any(|&(id, _)| id == tokens[0][0]),
                "{name} {p}: bf16's top token {} is not in fp32's top 5 {top5:?}",
                tokens[0][0]
            );
        }
    }
}

#[test]
fn an_architecture_the_decoder_does_not_implement_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("aiaas-gpt2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64,
            "n_layer": 2, "n_head": 4, "vocab_size": 256}"#,
    )
    .unwrap();
    let result = TorchDecoder::load(&dir, DecoderOptions::default());
    std::fs::remove_dir_all(&dir).unwrap();
    match result {
        Err(EngineError::Load { message, .. }) => {
            assert!(
                message.contains("unsupported architecture GPT2LMHeadModel"),
                "{message}"
            );
        }
        Err(other) => panic!("not a load error: {other}"),
        Ok(_) => panic!("GPT2LMHeadModel loaded"),
    }
}

#[test]
fn a_config_without_architectures_falls_back_to_model_type() {
    let dir = fixtures().join("llama-no-arch");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(
        config["architectures"].is_null(),
        "the fixture names architectures"
    );
    assert_eq!(load(&dir, Precision::Fp32).config().family, Family::Llama);
}

/// Out-of-range inputs are errors the scheduler can handle, not panics.
#[test]
fn tokens_and_blocks_outside_the_model_are_refused() {
    let dir = fixtures().join("llama-tied");
    let mut decoder = load(&dir, Precision::Fp32);
    let table = vec![0u32];
    let kv = decoder.kv();
    let cases: [(&[u32], usize, &[u32], &str); 4] = [
        (&[1_000_000], 0, &table, "outside the vocabulary"),
        (&[1, 2], 0, &[kv.num_blocks as u32], "outside the pool"),
        (&[1; 17], 0, &table, "need 2 blocks"),
        (&[1], kv.context_len, &table, "beyond the context"),
    ];
    for (tokens, start, blocks, expected) in cases {
        let e = decoder
            .prefill(&[PrefillInput {
                tokens,
                start,
                blocks,
            }])
            .unwrap_err();
        assert!(e.to_string().contains(expected), "{e}");
    }
}
