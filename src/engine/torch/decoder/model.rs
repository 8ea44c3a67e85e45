//! The decoder-only transformer every supported family is: one generic model, the families'
//! differences (q/k/v biases, q/k norms, sliding windows) being switches its config sets,
//! since a file per family would repeat the same layer four times. A step runs the linear
//! layers over all the step's tokens at once (q/k/v in one matmul, gate/up in one); attention
//! reads each sequence's keys and values in the paged cache, the sequences with one new token
//! (decoding) all in one call per layer, the others (prompts) one by one.

use tch::{Device, Kind, Tensor};

use super::blocks::{attention, decode_attention, rotate, Linear, Mlp, RmsNorm, Rotary};
use super::config::DecoderConfig;
use super::kv::KvPool;
use super::weights::Checkpoint;
use crate::engine::Quantization;

/// One step's tokens, on the model's device: several sequences' new tokens one after another.
pub(super) struct Step {
    /// `[tokens]` token ids: the decode sequences' tokens first, then each prompt's.
    pub tokens: Tensor,
    /// `[tokens]` each token's position in its sequence.
    pub positions: Tensor,
    /// `[tokens]` each token's slot in the KV pool (`block * block_size + offset`).
    pub slots: Tensor,
    /// The sequences with several new tokens (prompts or pieces of them), attended one by one.
    pub prompts: Vec<StepSeq>,
    /// The sequences with one new token (rows `0..sequences`), attended together.
    pub decodes: Option<DecodeBatch>,
    /// `[sequences]` the row of each sequence's last token, in the order the caller gave them.
    pub last: Tensor,
}

/// One prompt sequence's share of a step.
pub(super) struct StepSeq {
    /// Its first token's row in the step.
    pub row: i64,
    /// Its new tokens.
    pub len: i64,
    /// The position of its first new token (the positions before it are in the cache).
    pub start: i64,
    /// `[blocks]` its block table.
    pub blocks: Tensor,
}

/// A step's sequences with one new token each: each layer gathers all their keys and values with one `index_select` of their
/// block tables, padded to the longest, and attends them in one call, the padding masked.
pub(super) struct DecodeBatch {
    /// `[sequences * width]` the block tables, each padded to `width` blocks.
    pub blocks: Tensor,
    pub sequences: i64,
    /// The keys each sequence's gather yields (`width * block_size`).
    pub keys: i64,
    /// Where each layer's gather goes (`KvPool::gather_room`).
    pub room: (Tensor, Tensor),
    /// Per window setting among the layers: `[sequences, 1, 1, keys]`, true where a sequence
    /// sees a key; `None` where every sequence sees every gathered key.
    pub masks: Vec<(Option<i64>, Option<Tensor>)>,
}

struct Layer {
    input_norm: RmsNorm,
    /// q, k and v in one matrix (`[heads + 2 * kv_heads]` heads of output).
    qkv: Linear,
    o: Linear,
    /// Qwen3's norms over each head of q and k.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
    window: Option<i64>,
}

/// The loaded model: weights and rotary tables.
pub(super) struct Model {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `embed` again where the embeddings are tied.
    lm_head: Tensor,
    rotary: Rotary,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    scale: f64,
}

impl Model {
    /// Reads the weights `config` calls for from `checkpoint`, the blocks' linear layers
    /// quantized where `quantization` says; rotary tables up to `context`.
    pub fn load(
        config: &DecoderConfig,
        checkpoint: &mut Checkpoint,
        context: usize,
        kind: Kind,
        device: Device,
        quantization: Option<Quantization>,
    ) -> Result<Self, String> {
        let c = config;
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let (q_out, kv_out) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed = checkpoint.tensor("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let norm = |ck: &mut Checkpoint, name: &str, size: usize| {
            Ok::<_, String>(RmsNorm {
                weight: ck.tensor(name, &[size])?,
                eps: c.rms_norm_eps,
            })
        };
        // several of the checkpoint's linear layers over the same input, as one: their
        // weights (and biases) one after another along the output
        let linear = |ck: &mut Checkpoint, parts: &[(&str, usize)], inp: usize, bias: bool| {
            let mut weights = Vec::with_capacity(parts.len());
            let mut biases = Vec::with_capacity(parts.len());
            for &(name, out) in parts {
                weights.push(ck.tensor(&format!("{name}.weight"), &[out, inp])?);
                if bias {
                    biases.push(ck.tensor(&format!("{name}.bias"), &[out])?);
                }
            }
            let join = |t: Vec<Tensor>| match t.len() {
                1 => t.into_iter().next().expect("one part"),
                _ => Tensor::cat(&t, 0),
            };
            let (weight, bias) = (join(weights), bias.then(|| join(biases)));
            match quantization {
                None => Ok::<_, String>(Linear::new(weight, bias)),
                Some(q) => Linear::quantized(&weight, bias, q),
            }
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, window) in c.windows.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let ck = &mut *checkpoint;
            layers.push(Layer {
                input_norm: norm(ck, &format!("{p}.input_layernorm.weight"), hidden)?,
                qkv: linear(
                    ck,
                    &[
                        (&format!("{attn}.q_proj"), q_out),
                        (&format!("{attn}.k_proj"), kv_out),
                        (&format!("{attn}.v_proj"), kv_out),
                    ],
                    hidden,
                    c.qkv_bias,
                )?,
                o: linear(ck, &[(&format!("{attn}.o_proj"), hidden)], q_out, c.o_bias)?,
                qk_norm: if c.qk_norm {
                    Some((
                        norm(ck, &format!("{attn}.q_norm.weight"), c.head_dim)?,
                        norm(ck, &format!("{attn}.k_norm.weight"), c.head_dim)?,
                    ))
                } else {
                    None
                },
                post_attention_norm: norm(
                    ck,
                    &format!("{p}.post_attention_layernorm.weight"),
                    hidden,
                )?,
                mlp: Mlp {
                    gate_up: linear(
                        ck,
                        &[
                            (&format!("{mlp}.gate_proj"), inter),
                            (&format!("{mlp}.up_proj"), inter),
                        ],
                        hidden,
                        c.mlp_bias,
                    )?,
                    down: linear(
                        ck,
                        &[(&format!("{mlp}.down_proj"), hidden)],
                        inter,
                        c.mlp_bias,
                    )?,
                    inter: inter as i64,
                },
                window: window.map(|w| w as i64),
            });
        }
        let norm = norm(checkpoint, "model.norm.weight", hidden)?;
        let lm_head = if c.tie_word_embeddings || !checkpoint.has("lm_head.weight") {
            checkpoint.skip("lm_head.weight");
            embed.shallow_clone()
        } else {
            checkpoint.tensor("lm_head.weight", &[c.vocab_size, hidden])?
        };
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config, context, kind, device),
            heads: c.num_heads as i64,
            kv_heads: c.num_kv_heads as i64,
            head_dim: c.head_dim as i64,
            scale: (c.head_dim as f64).powf(-0.5),
        })
    }

    /// Runs one step: writes the new tokens' keys and values into `kv` and returns each
    /// sequence's last-position logits, `[sequences, vocab]` in the model's precision.
    pub fn forward(&self, step: &Step, kv: &mut KvPool) -> Tensor {
        let tokens = step.tokens.size()[0];
        let (q_width, kv_width) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let (cos, sin) = self.rotary.at(&step.positions);
        let mut x = Tensor::embedding(&self.embed, &step.tokens, -1, false, false);
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x);
            let qkv = layer.qkv.forward(&h);
            let mut q = qkv
                .narrow(1, 0, q_width)
                .view([tokens, self.heads, self.head_dim]);
            let mut k =
                qkv.narrow(1, q_width, kv_width)
                    .view([tokens, self.kv_heads, self.head_dim]);
            let v = qkv.narrow(1, q_width + kv_width, kv_width).view([
                tokens,
                self.kv_heads,
                self.head_dim,
            ]);
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                q = q_norm.forward(&q);
                k = k_norm.forward(&k);
            }
            let q = rotate(&q, &cos, &sin);
            let k = rotate(&k, &cos, &sin);
            kv.write(i, &step.slots, &k, &v);
            let mut outs = Vec::with_capacity(step.prompts.len() + 1);
            if let Some(d) = &step.decodes {
                let q = q.narrow(0, 0, d.sequences);
                outs.push(self.attend_decodes(i, layer.window, &q, d, kv));
            }
            for s in &step.prompts {
                outs.push(self.attend(i, layer.window, &q.narrow(0, s.row, s.len), s, kv));
            }
            let attended = if outs.len() == 1 {
                outs.into_iter().next().expect("one output")
            } else {
                Tensor::cat(&outs, 0)
            };
            x += layer.o.forward(&attended);
            let h = layer.post_attention_norm.forward(&x);
            x = &x + layer.mlp.forward(&h);
        }
        // the norm is per row: only the rows whose logits are asked for need it
        let last = self.norm.forward(&x.index_select(0, &step.last));
        last.linear::<Tensor>(&self.lm_head, None)
    }

    /// The decode sequences' attention in `layer`: their queries `q` (`[sequences, heads,
    /// head_dim]`, one each) over their cached keys, all in one call.
    fn attend_decodes(
        &self,
        layer: usize,
        window: Option<i64>,
        q: &Tensor,
        batch: &DecodeBatch,
        kv: &KvPool,
    ) -> Tensor {
        let (k, v) = kv.gather(
            layer,
            &batch.blocks,
            &batch.room,
            batch.sequences,
            batch.keys,
        );
        let mask = batch
            .masks
            .iter()
            .find(|(w, _)| *w == window)
            .and_then(|(_, m)| m.as_ref());
        decode_attention(q, &k, &v, mask, self.scale)
    }

    /// One sequence's attention in `layer`: its queries `q` (`[len, heads, head_dim]`) over its
    /// cached keys, each query seeing the positions up to its own (within the window).
    fn attend(
        &self,
        layer: usize,
        window: Option<i64>,
        q: &Tensor,
        seq: &StepSeq,
        kv: &KvPool,
    ) -> Tensor {
        let end = seq.start + seq.len;
        // the first position any of these queries sees
        let from = window.map_or(0, |w| (seq.start + 1 - w).max(0));
        let (k, v) = kv.read(layer, &seq.blocks, from, end);
        if seq.len == 1 {
            return attention(q, &k, &v, None, false, self.scale);
        }
        if from == 0 && seq.start == 0 && window.is_none_or(|w| w >= end) {
            return attention(q, &k, &v, None, true, self.scale);
        }
        let device = q.device();
        let query_pos = Tensor::arange_start(seq.start, end, (Kind::Int64, device)).unsqueeze(1);
        let key_pos = Tensor::arange_start(from, end, (Kind::Int64, device)).unsqueeze(0);
        let mut mask = key_pos.le_tensor(&query_pos);
        if let Some(w) = window {
            mask = mask.logical_and(&key_pos.gt_tensor(&(&query_pos - w)));
        }
        attention(q, &k, &v, Some(&mask), false, self.scale)
    }
}
