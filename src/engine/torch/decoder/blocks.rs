//! The building blocks every family is made of, each computed as transformers computes it (same
//! operations, same order, same precision at each step) so that the decoder's numbers are the
//! reference's: linear layers, RMSNorm, rotary embeddings in the rotate-half layout (with Llama
//! 3.1's frequency scaling), grouped-query attention and the gated SiLU MLP.

use tch::{Device, Kind, Tensor};

use super::config::{DecoderConfig, Llama3Scaling};

/// `x @ w.T + b`.
pub(super) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` is `[out, in]`, as checkpoints hold it.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// Root-mean-square norm over the last dimension, computed in fp32 and scaled in the model's
/// precision (transformers' `LlamaRMSNorm`).
pub(super) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, None);
        let h = h * (variance + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

/// Rotary position embeddings: cos and sin for every position up to the context length,
/// computed once at load in fp32 and kept in the model's precision.
pub(super) struct Rotary {
    /// `[context, head_dim]` each.
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(config: &DecoderConfig, context: usize, kind: Kind, device: Device) -> Self {
        let inv_freq = inv_freq(config.head_dim, config.rope_theta, config.rope_scaling);
        let positions = Tensor::arange(context as i64, (Kind::Float, Device::Cpu));
        let freqs = positions.unsqueeze(-1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let place = |t: Tensor| t.to_kind(kind).to_device(device);
        Self {
            cos: place(emb.cos()),
            sin: place(emb.sin()),
        }
    }

    /// cos and sin at each of `positions` (`[tokens]`), shaped `[tokens, 1, head_dim]` to
    /// broadcast over the heads.
    pub fn at(&self, positions: &Tensor) -> (Tensor, Tensor) {
        (
            self.cos.index_select(0, positions).unsqueeze(1),
            self.sin.index_select(0, positions).unsqueeze(1),
        )
    }
}

/// Rotates `x` (`[tokens, heads, head_dim]`) by the angles `cos`/`sin` give, in the
/// rotate-half layout (the first half of each head pairs with the second).
pub(super) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let x1 = x.narrow(2, 0, half);
    let x2 = x.narrow(2, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
    x * cos + rotated * sin
}

/// The rotary inverse frequencies, with transformers' operations in its order (Python's
/// `a / t` is `t.reciprocal() * a`), so that they come out bit for bit the same.
fn inv_freq(head_dim: usize, theta: f64, scaling: Option<Llama3Scaling>) -> Tensor {
    let dim = head_dim as f64;
    let exponents = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim;
    let inv_freq = Tensor::pow_scalar(theta, &exponents).reciprocal() * 1.0;
    let Some(s) = scaling else {
        return inv_freq;
    };
    // transformers' _compute_llama3_parameters
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    let scaled = (&inv_freq / s.factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
    let smooth = (wavelen.reciprocal() * old_context - s.low_freq_factor)
        / (s.high_freq_factor - s.low_freq_factor);
    let smoothed = (smooth.neg() + 1.0) * &scaled / s.factor + &smooth * &scaled;
    let medium = wavelen
        .lt(high_freq_wavelen)
        .logical_not()
        .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
    smoothed.where_self(&medium, &scaled)
}

/// Attention of `q` (`[queries, heads, head_dim]`) over `k` and `v` (`[keys, kv_heads,
/// head_dim]`), the kv heads shared by groups of query heads; `mask` (`[queries, keys]`, true
/// where a query sees a key) or `causal` (queries and keys the same positions) or neither (every
/// query sees every key). Returns `[queries, heads * head_dim]`.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
) -> Tensor {
    let queries = q.size()[0];
    // [1, heads, positions, head_dim], as transformers calls it (its CPU kernel wants 4-D)
    let q = q.transpose(0, 1).unsqueeze(0);
    let k = k.transpose(0, 1).unsqueeze(0);
    let v = v.transpose(0, 1).unsqueeze(0);
    let out = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, scale, true);
    out.squeeze_dim(0)
        .transpose(0, 1)
        .contiguous()
        .view([queries, -1])
}

/// Attention of one query per sequence, `q` (`[sequences, heads, head_dim]`), over each
/// sequence's keys and values (`[sequences, kv_heads, keys, head_dim]`), where `mask`
/// (`[sequences, 1, 1, keys]`) is true (every key where `None`). The query heads sharing a kv
/// head are its queries, so that the keys and values are never repeated per query head.
/// Returns `[sequences, heads * head_dim]`.
pub(super) fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Tensor {
    let (sequences, heads, head_dim) = q.size3().expect("q is [sequences, heads, head_dim]");
    let kv_heads = k.size()[1];
    let q = q.view([sequences, kv_heads, heads / kv_heads, head_dim]);
    // libtorch's CPU kernel may lay its output out as [sequences, queries, heads, head_dim]
    Tensor::scaled_dot_product_attention(&q, k, v, mask, 0.0, false, scale, false)
        .reshape([sequences, heads * head_dim])
}

/// The gated MLP: `down(silu(gate(x)) * up(x))`.
pub(super) struct Mlp {
    /// gate and up in one matrix, gate's `inter` outputs first.
    pub gate_up: Linear,
    pub down: Linear,
    pub inter: i64,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gate_up = self.gate_up.forward(x);
        let gate = gate_up.narrow(-1, 0, self.inter);
        let up = gate_up.narrow(-1, self.inter, self.inter);
        self.down.forward(&(gate.silu() * up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's published scaling (factor 8, 1, 4, 8192) on a 128-wide head at base 500000:
    /// the highest frequencies kept, the lowest divided by 8, the band between interpolated.
    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = Vec::<f32>::try_from(inv_freq(128, 500000.0, None)).unwrap();
        let scaled = Vec::<f32>::try_from(inv_freq(128, 500000.0, Some(scaling))).unwrap();
        assert_eq!(plain[0], 1.0);
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[63], plain[63] / 8.0);
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        let medium = (0..64)
            .filter(|&i| wavelen(plain[i]) >= 2048.0 && wavelen(plain[i]) <= 8192.0)
            .collect::<Vec<_>>();
        assert!(!medium.is_empty());
        for i in medium {
            assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0, "{i}");
        }
    }

    #[test]
    fn rotation_turns_each_pair_by_its_angle() {
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([1, 1, 4]);
        let cos = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0]).view([1, 1, 4]);
        let sin = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([1, 1, 4]);
        // pairs (x0, x2) = (1, 0) turned by 90 degrees; (x1, x3) = (0, 1) by 0
        let y = Vec::<f32>::try_from(rotate(&x, &cos, &sin).flatten(0, -1)).unwrap();
        assert_eq!(y, vec![0.0, 0.0, 1.0, 1.0]);
    }
}
