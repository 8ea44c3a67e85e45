//! Driving a decoder directly, as the scheduler would (for the decoder and quantization tests and
//! the decoder benchmark): its KV blocks handed out by the scheduler's pool, greedy choices, and
//! a greedy loop over several prompts at once.

use aiaas::engine::{DecodeInput, Decoder, KvGeometry, Logits, PrefillInput, TorchDecoder};
use aiaas::generate::scheduler::BlockPool;

/// The blocks of a decoder's KV pool, handed out as the scheduler does (no prefix cache).
pub fn pool_of(kv: &KvGeometry) -> BlockPool {
    BlockPool::new(kv.block_size, kv.num_blocks, false)
}

/// The index of the largest logit (the first of equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding of `prompts` together (one prefill, then decode steps over all of them):
/// each sequence's `steps` new tokens and its prompt's logits. Every block goes back after.
pub fn greedy(
    decoder: &mut TorchDecoder,
    blocks: &mut BlockPool,
    prompts: &[&[u32]],
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<Logits>) {
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for (table, p) in tables.iter_mut().zip(prompts) {
        blocks.reserve(table, p.len()).unwrap();
    }
    let inputs: Vec<PrefillInput> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| PrefillInput {
            tokens: p,
            start: 0,
            blocks: t,
        })
        .collect();
    let first = decoder.prefill(&inputs).unwrap();
    let mut out: Vec<Vec<u32>> = first.iter().map(|l| vec![argmax(l)]).collect();
    for _ in 1..steps {
        for ((table, p), toks) in tables.iter_mut().zip(prompts).zip(&out) {
            blocks.reserve(table, p.len() + toks.len()).unwrap();
        }
        let inputs: Vec<DecodeInput> = prompts
            .iter()
            .zip(&tables)
            .zip(&out)
            .map(|((p, t), toks)| DecodeInput {
                token: *toks.last().unwrap(),
                position: p.len() + toks.len() - 1,
                blocks: t,
            })
            .collect();
        let logits = decoder.decode(&inputs).unwrap();
        for (toks, l) in out.iter_mut().zip(&logits) {
            toks.push(argmax(l));
        }
    }
    for table in &mut tables {
        blocks.release(table);
    }
    (out, first)
}
