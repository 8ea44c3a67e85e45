//! The text classifier: a word-level tokenizer (Chinese split into characters) built from the
//! bundled corpus, and embedding → masked mean pooling → dense → softmax.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer, TruncationParams};

use super::{check_trace, finish, progress, trace_and_save, write};

const CORPUS: &str = include_str!("corpus.tsv");
const MAX_LENGTH: usize = 64;
const PAD_ID: i64 = 0;
const EMBEDDING_DIM: i64 = 32;
const HIDDEN: i64 = 32;

/// (sentence, label index: 0 negative, 1 positive)
fn corpus() -> Result<Vec<(String, i64)>> {
    CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (label, text) = line
                .split_once('\t')
                .ok_or_else(|| anyhow!("corpus line without a tab: {line}"))?;
            let y = match label {
                "negative" => 0,
                "positive" => 1,
                other => bail!("unknown label '{other}' in corpus"),
            };
            Ok((text.to_string(), y))
        })
        .collect()
}

/// Lower-cases, splits CJK characters apart, splits on whitespace and punctuation, and maps
/// words to ids; unknown words become [UNK]; [PAD] is id 0.
fn build_tokenizer(sentences: &[&str]) -> Result<Tokenizer> {
    let model = WordLevel::builder()
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    let mut trainer: TrainerWrapper = WordLevelTrainer::builder()
        .special_tokens(vec![
            AddedToken::from("[PAD]", true),
            AddedToken::from("[UNK]", true),
        ])
        .show_progress(false)
        .build()
        .map_err(|e| anyhow!("{e}"))?
        .into();
    tokenizer
        .train(&mut trainer, sentences.iter().copied())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_LENGTH,
            ..Default::default()
        }))
        .map_err(|e| anyhow!("{e}"))?;
    if tokenizer.token_to_id("[PAD]") != Some(PAD_ID as u32)
        || tokenizer.token_to_id("[UNK]") != Some(1)
    {
        bail!("special tokens did not get ids 0 ([PAD]) and 1 ([UNK])");
    }
    Ok(tokenizer)
}

struct TextNet {
    embedding: nn::Embedding,
    hidden: nn::Linear,
    out: nn::Linear,
}

impl TextNet {
    fn new(vs: &nn::Path, vocab: i64) -> Self {
        Self {
            embedding: nn::embedding(vs / "embedding", vocab, EMBEDDING_DIM, Default::default()),
            hidden: nn::linear(vs / "hidden", EMBEDDING_DIM, HIDDEN, Default::default()),
            out: nn::linear(vs / "out", HIDDEN, 2, Default::default()),
        }
    }

    /// Mean of the non-padding token embeddings, so that padding never changes a result.
    fn logits(&self, ids: &Tensor) -> Tensor {
        // a boolean mask and sums in the embeddings' own type: a trace of `to_kind(Float)` would
        // fix the CPU as the device and fp32 as the type in the served graph
        let mask = ids.ne(PAD_ID).unsqueeze(-1);
        let summed = (ids.apply(&self.embedding) * &mask).sum_dim_intlist(1, false, None);
        let count = mask.sum_dim_intlist(1, false, None).clamp_min(1);
        (summed / count).apply(&self.hidden).relu().apply(&self.out)
    }
}

/// Token ids padded with [PAD] to the longest row.
fn pad(rows: &[Vec<i64>]) -> Tensor {
    let len = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut flat = Vec::with_capacity(rows.len() * len);
    for r in rows {
        flat.extend_from_slice(r);
        flat.extend(std::iter::repeat_n(PAD_ID, len - r.len()));
    }
    Tensor::from_slice(&flat).view([rows.len() as i64, len as i64])
}

pub fn train(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let started = Instant::now();
    let mut data = corpus()?;
    let sentences: Vec<&str> = data.iter().map(|(s, _)| s.as_str()).collect();
    let tokenizer = build_tokenizer(&sentences)?;
    let encode = |s: &str| -> Result<Vec<i64>> {
        let e = tokenizer.encode(s, true).map_err(|e| anyhow!("{e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7e47);
    data.shuffle(&mut rng);
    let held_out = data.len() / 8;
    let (test, train) = data.split_at(held_out);
    let encode_all = |rows: &[(String, i64)]| -> Result<(Vec<Vec<i64>>, Tensor)> {
        let ids = rows
            .iter()
            .map(|(s, _)| encode(s))
            .collect::<Result<Vec<_>>>()?;
        let ys: Vec<i64> = rows.iter().map(|(_, y)| *y).collect();
        Ok((ids, Tensor::from_slice(&ys)))
    };
    let (train_ids, train_y) = encode_all(train)?;
    let (test_ids, test_y) = encode_all(test)?;
    let vocab = tokenizer.get_vocab_size(true) as i64;

    let vs = nn::VarStore::new(Device::Cpu);
    let net = TextNet::new(&vs.root(), vocab);
    let mut opt = nn::Adam::default().build(&vs, 0.01)?;
    let epochs = 80;
    let batch = 32;
    let pb = progress(epochs, "text-classifier");
    let (mut train_acc, mut test_acc) = (0.0, 0.0);
    let mut order: Vec<usize> = (0..train_ids.len()).collect();
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0, 0.0);
        for chunk in order.chunks(batch) {
            let rows: Vec<Vec<i64>> = chunk.iter().map(|&i| train_ids[i].clone()).collect();
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let y = train_y.index_select(0, &idx);
            let logits = net.logits(&pad(&rows));
            let loss = logits.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            loss_sum += loss.double_value(&[]) * chunk.len() as f64;
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Float)
                .double_value(&[]);
        }
        train_acc = correct / train_ids.len() as f64;
        test_acc = tch::no_grad(|| {
            net.logits(&pad(&test_ids))
                .argmax(-1, false)
                .eq_tensor(&test_y)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        });
        pb.set_message(format!(
            "loss {:.4} acc {:.1}% held-out acc {:.1}%",
            loss_sum / train_ids.len() as f64,
            100.0 * train_acc,
            100.0 * test_acc
        ));
        pb.inc(1);
    }
    finish(&pb, pb.message());
    println!(
        "text-classifier: {} sentences, vocabulary {vocab}, train accuracy {:.1}%, held-out accuracy {:.1}% ({} sentences), {:.1}s",
        data.len(),
        100.0 * train_acc,
        100.0 * test_acc,
        test_ids.len(),
        started.elapsed().as_secs_f64()
    );
    if train_acc < 0.95 {
        bail!(
            "text-classifier train accuracy {:.1}% is too low",
            100.0 * train_acc
        );
    }
    let mut vs = vs;
    vs.freeze();
    let probs = |ids: &Tensor| net.logits(ids).softmax(-1, Kind::Float);
    let path = dir.join("model.pt");
    let example = pad(&[encode("我爱你")?]);
    let module = trace_and_save("TextClassifier", &example, &probs, &path)?;
    // other batch sizes and lengths, padding included, must give what the eager model gives
    let probe = pad(&test_ids[..5.min(test_ids.len())]);
    check_trace(&module, &tch::no_grad(|| probs(&probe)), &probe)?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("{e}"))
        .context("saving tokenizer.json")?;
    write(
        &dir.join("model.toml"),
        &format!(
            r#"# The seed text's NLP example: embedding -> pooling -> dense -> softmax (positive / negative),
# trained on a bundled corpus of short Chinese and English sentences.
kind = "text-classifier"
description = "Sentiment of short Chinese or English sentences (seed example 4.2)"
file = "model.pt"
device = "auto"

[batching]
max_batch_size = 64
max_queue_delay_ms = 0.0
queue_capacity = 4096

# Hugging Face tokenizer: lower-cased, CJK characters split apart, unknown words -> [UNK].
# Sequences in one batch are padded with pad_id; the model ignores padding (masked mean).
[text]
tokenizer = "tokenizer.json"
max_length = {MAX_LENGTH}
pad_id = {PAD_ID}

[output]
labels = ["negative", "positive"]
softmax = false  # the model already returns probabilities
"#
        ),
    )
}
