//! The building blocks every family is made of, each computed as transformers computes it (same
//! operations, same order, same precision at each step) so that the decoder's numbers are the
//! reference's: linear layers, RMSNorm, rotary embeddings in the rotate-half layout (with Llama
//! 3.1's frequency scaling), grouped-query attention and the gated SiLU MLP.

use tch::{Device, Kind, Tensor};

use super::config::{DecoderConfig, Llama3Scaling};
use crate::engine::torch::first_line;
use crate::engine::Quantization;

/// `x @ w.T + b`, the weight in the model's precision or quantized (weight-only, computed at
/// load): the quantized kinds run libtorch's packed CPU kernels with the activations in bf16,
/// the precision those kernels are fast in (with fp32 activations they run several times
/// slower than the fp32 matmul), and give the result back in the input's precision.
///
/// The packed kernels are built for decoding: their time grows with the rows as one
/// vector-matrix product per row, so from [`DEQUANTIZE_INT8_FROM_ROWS`] /
/// [`DEQUANTIZE_INT4_FROM_ROWS`] rows on (larger batches, prompts) a quantized layer instead
/// dequantizes its weight for the call and runs the fp32 matmul, whose cost per row falls with
/// the rows. Both ways compute with the same bf16-rounded inputs, scales and
/// output, so a sequence's numbers do not depend on which way its step went (beyond the order
/// of the fp32 sums, as with any change of batch).
pub(super) enum Linear {
    Full {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Symmetric int8 per output channel: `w = q * scale`.
    Int8 {
        /// `[out, in]` int8.
        weight: Tensor,
        /// `[out]` bf16.
        scales: Tensor,
        bias: Option<Tensor>,
    },
    /// Asymmetric 4-bit per group of `group_size` inputs (gpt-fast's layout): `w = (q - 8) *
    /// scale + zero`, `q` in 0..16.
    Int4 {
        /// `[out, in / 2]` uint8, as `_convert_weight_to_int4pack_for_cpu` packs it.
        weight: Tensor,
        /// `[in / group_size, out, 2]` bf16: each group's scale and zero.
        scales_and_zeros: Tensor,
        group_size: i64,
        bias: Option<Tensor>,
        /// The packing is the layout [`unpack_int4`] reads (checked at load on the layer's own
        /// weight), so the layer may be dequantized for prompts; otherwise it always runs the
        /// kernel.
        unpackable: bool,
    },
}

/// The activations' precision in the quantized kernels.
const QUANTIZED_ACTIVATIONS: Kind = Kind::BFloat16;

/// Rows (tokens in a step) from which an int8 layer is dequantized for the call (one int8 to
/// fp32 conversion; the scales go on the product's columns) and multiplied in fp32 rather than
/// run through its packed kernel. Measured over SmolLM2-135M's 30 layers (2 threads,
/// AVX512-BF16), kernel against dequantized: 58 / 57 ms at 32 rows, 113 / 90 at 64, 221 / 130
/// at 128.
pub(super) const DEQUANTIZE_INT8_FROM_ROWS: i64 = 32;

/// The same for int4 layers, whose unpacking costs more (about 100 ms over the same layers):
/// kernel against dequantized 280 / 222 ms at 128 rows, 459 / 363 at 256, 917 / 578 at 512.
pub(super) const DEQUANTIZE_INT4_FROM_ROWS: i64 = 128;

/// The rows of every block of 64 output channels that `_convert_weight_to_int4pack_for_cpu`
/// packs together: block `b`'s byte `[k, d]` holds row `64 b + d` in its low nibble and row
/// `64 b + 32 + d` in its high one, for every input `k` (libtorch 2.11 on AVX-512 CPUs).
const INT4_PACK_ROWS: i64 = 64;

/// `packed` (`[out, in / 2]` uint8) back to `[out, in]` fp32 values 0..16, or `None` where
/// `out` is not a whole number of packing blocks. Each half of a block is written in place
/// (one strided copy each), not concatenated and transposed after.
fn unpack_int4(packed: &Tensor, out: i64, inp: i64) -> Option<Tensor> {
    if out % INT4_PACK_ROWS != 0 || packed.size() != [out, inp / 2] {
        return None;
    }
    let (blocks, half) = (out / INT4_PACK_ROWS, INT4_PACK_ROWS / 2);
    let v = packed.view([blocks, inp, half]);
    let unpacked = Tensor::empty([blocks, 2, half, inp], (Kind::Float, packed.device()));
    for (i, nibbles) in [v.bitwise_and(0x0F), v.bitwise_right_shift_tensor_scalar(4)]
        .iter()
        .enumerate()
    {
        unpacked
            .select(1, i as i64)
            .copy_(&nibbles.permute([0, 2, 1]));
    }
    Some(unpacked.view([out, inp]))
}

impl Linear {
    /// `weight` is `[out, in]`, as checkpoints hold it.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Full { weight, bias }
    }

    /// `weight` (`[out, in]`, any float precision) quantized as `quantization` asks; an error
    /// where its shape does not suit the quantization.
    pub fn quantized(
        weight: &Tensor,
        bias: Option<Tensor>,
        quantization: Quantization,
    ) -> Result<Self, String> {
        let w = weight.to_kind(Kind::Float);
        let (out, inp) = w.size2().map_err(|e| e.to_string())?;
        match quantization {
            Quantization::Int8 => {
                // the scales rounded to bf16 first, so that q * scale is the weight the
                // kernel computes with
                let scales = (w.abs().amax([1].as_slice(), false).clamp_min(1e-12) / 127.0)
                    .to_kind(QUANTIZED_ACTIVATIONS);
                let q = (&w / scales.to_kind(Kind::Float).unsqueeze(1))
                    .round()
                    .clamp(-127, 127)
                    .to_kind(Kind::Int8);
                Ok(Self::Int8 {
                    weight: q.contiguous(),
                    scales: scales.contiguous(),
                    bias,
                })
            }
            Quantization::Int4 { group_size } => {
                let g = group_size as i64;
                if inp % g != 0 {
                    return Err(format!(
                        "quantization int4: a layer's {inp} inputs are not a multiple of \
                         quantization_group_size {g}"
                    ));
                }
                let groups = inp / g;
                let wg = w.view([out, groups, g]);
                let max = wg.amax([2].as_slice(), false);
                let min = wg.amin([2].as_slice(), false);
                let scales = ((&max - &min).clamp_min(1e-6) / 15.0).to_kind(QUANTIZED_ACTIVATIONS);
                let zeros =
                    (&min + scales.to_kind(Kind::Float) * 8.0).to_kind(QUANTIZED_ACTIVATIONS);
                let (s, z) = (scales.to_kind(Kind::Float), zeros.to_kind(Kind::Float));
                let q = ((&wg - z.unsqueeze(2)) / s.unsqueeze(2) + 8.0)
                    .round()
                    .clamp(0, 15)
                    .to_kind(Kind::Int)
                    .view([out, inp]);
                let packed = q
                    .f_internal_convert_weight_to_int4pack_for_cpu(1)
                    .map_err(|e| format!("quantization int4: {}", first_line(&e.to_string())))?;
                let unpackable = unpack_int4(&packed, out, inp)
                    .is_some_and(|u| u.equal(&q.to_kind(Kind::Float)));
                let scales_and_zeros = Tensor::stack(&[&scales, &zeros], 2)
                    .transpose(0, 1)
                    .contiguous();
                Ok(Self::Int4 {
                    weight: packed,
                    scales_and_zeros,
                    group_size: g,
                    bias,
                    unpackable,
                })
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let input = match self {
            Self::Full { weight, bias } => return x.linear(weight, bias.as_ref()),
            _ => packed_input(x),
        };
        let rows = input.size()[0];
        let (y, bias) = match self {
            Self::Full { .. } => unreachable!("returned above"),
            Self::Int8 {
                weight,
                scales,
                bias,
            } => (
                if rows >= DEQUANTIZE_INT8_FROM_ROWS {
                    // the scales applied to the product's columns, as the kernel applies them
                    product(&input, &weight.to_kind(Kind::Float), Some(scales))
                } else {
                    input.internal_weight_int8pack_mm(weight, scales)
                },
                bias,
            ),
            Self::Int4 {
                weight,
                scales_and_zeros,
                group_size,
                bias,
                unpackable,
            } => (
                if rows >= DEQUANTIZE_INT4_FROM_ROWS && *unpackable {
                    product(
                        &input,
                        &dequantize_int4(weight, scales_and_zeros, *group_size),
                        None,
                    )
                } else {
                    input.internal_weight_int4pack_mm_for_cpu(weight, *group_size, scales_and_zeros)
                },
                bias,
            ),
        };
        let mut shape = x.size();
        *shape.last_mut().expect("x has a last dimension") = y.size()[1];
        let y = y.to_kind(x.kind()).view(shape.as_slice());
        match bias {
            Some(b) => y + b,
            None => y,
        }
    }
}

/// `input @ weight.T` in fp32 (`input` bf16 as the kernels take it, `weight` dequantized to
/// fp32), times the output channels' `scales` if given, rounded to bf16 as the kernels give
/// it.
fn product(input: &Tensor, weight: &Tensor, scales: Option<&Tensor>) -> Tensor {
    let y = input.to_kind(Kind::Float).linear::<Tensor>(weight, None);
    match scales {
        Some(s) => y * s.to_kind(Kind::Float),
        None => y,
    }
    .to_kind(QUANTIZED_ACTIVATIONS)
}

/// The fp32 weight `(q - 8) * scale + zero` of a packed int4 layer whose packing
/// [`unpack_int4`] reads.
fn dequantize_int4(packed: &Tensor, scales_and_zeros: &Tensor, group_size: i64) -> Tensor {
    let (out, inp) = (packed.size()[0], packed.size()[1] * 2);
    let mut w = unpack_int4(packed, out, inp)
        .expect("checked at load")
        .view([out, inp / group_size, group_size]);
    // [out, groups, 2] in fp32
    let sz = scales_and_zeros.to_kind(Kind::Float).transpose(0, 1);
    let (scale, zero) = (sz.select(2, 0).unsqueeze(2), sz.select(2, 1).unsqueeze(2));
    let offset = zero - &scale * 8.0;
    let _ = w.g_mul_(&scale).g_add_(&offset);
    w.view([out, inp])
}

/// `x` as the packed kernels take it: 2-D, contiguous, bf16.
fn packed_input(x: &Tensor) -> Tensor {
    x.reshape([-1, *x.size().last().expect("x has a last dimension")])
        .to_kind(QUANTIZED_ACTIVATIONS)
        .contiguous()
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

    /// `y` against `reference`: the packed kernels return bf16, so agreement is to bf16's
    /// rounding of the largest output (a wrong packing or scale layout is off by the outputs'
    /// own size).
    fn assert_close(y: &Tensor, reference: &Tensor) {
        let scale = reference.abs().max().double_value(&[]);
        let err = (y - reference).abs().max().double_value(&[]);
        assert!(
            err <= scale / 128.0,
            "error {err} against outputs up to {scale}"
        );
    }

    /// `[rows, cols]` random integers in `lo..=hi`, as fp32.
    fn integers(rows: i64, cols: i64, lo: i64, hi: i64) -> Tensor {
        Tensor::randint_low(lo, hi + 1, [rows, cols], (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
    }

    /// Rows from which both quantizations dequantize.
    const MANY: i64 = if DEQUANTIZE_INT8_FROM_ROWS > DEQUANTIZE_INT4_FROM_ROWS {
        DEQUANTIZE_INT8_FROM_ROWS
    } else {
        DEQUANTIZE_INT4_FROM_ROWS
    };

    /// Inputs of a few rows (run by the packed kernels) and of [`MANY`] rows (dequantized):
    /// `[2, 3, inp]` and `[2, MANY / 2, inp]`.
    fn inputs_both_ways(inp: i64) -> [Tensor; 2] {
        [3, MANY / 2].map(|rows| Tensor::randn([2, rows, inp], (Kind::Float, Device::Cpu)))
    }

    /// Weights that int8 holds exactly (`q * scale`, each row reaching +-127, the scales bf16
    /// numbers): the quantized layer computes the fp32 matmul of the same weights, to the
    /// kernel's bf16 rounding, with and without a bias, over a few rows (the kernel) and many
    /// (dequantized) alike.
    #[test]
    fn int8_linear_computes_the_matmul_of_its_weights() {
        tch::manual_seed(1);
        let (out, inp) = (96, 160);
        let q = integers(out, inp, -127, 127);
        let _ = q.narrow(1, 0, 1).fill_(127.0);
        let scales = integers(out, 1, 1, 200) / 4096.0;
        let w = &q * &scales;
        let bias = Tensor::randn([out], (Kind::Float, Device::Cpu));
        for x in inputs_both_ways(inp) {
            let x_bf16 = x.to_kind(Kind::BFloat16).to_kind(Kind::Float);
            for bias in [None, Some(bias.shallow_clone())] {
                let linear = Linear::quantized(
                    &w,
                    bias.as_ref().map(Tensor::shallow_clone),
                    Quantization::Int8,
                )
                .unwrap();
                assert!(matches!(linear, Linear::Int8 { .. }));
                let y = linear.forward(&x);
                assert_eq!(y.size(), [2, x.size()[1], out]);
                assert_eq!(y.kind(), Kind::Float);
                assert_close(&y, &x_bf16.linear(&w, bias.as_ref()));
            }
        }
    }

    /// A row's output is the same whether its step ran the packed kernel (few rows) or
    /// dequantized the layer (many rows), to one bf16 rounding: both round the same inputs,
    /// scales and outputs to bf16. int4 layers whose packing is not the one `unpack_int4`
    /// reads (96 outputs: not whole blocks of 64) run the kernel at any number of rows.
    #[test]
    fn quantized_rows_do_not_depend_on_the_steps_size() {
        tch::manual_seed(4);
        for (out, q) in [
            (128, Quantization::Int8),
            (128, Quantization::Int4 { group_size: 32 }),
            (96, Quantization::Int4 { group_size: 32 }),
        ] {
            let w = Tensor::randn([out, 256], (Kind::Float, Device::Cpu)) * 0.05;
            let linear = Linear::quantized(&w, None, q).unwrap();
            if let Linear::Int4 { unpackable, .. } = &linear {
                assert_eq!(*unpackable, out % 64 == 0, "{out} outputs");
            }
            let many = Tensor::randn([MANY, 256], (Kind::Float, Device::Cpu));
            let together = linear.forward(&many).narrow(0, 0, 4);
            let alone = linear.forward(&many.narrow(0, 0, 4));
            let scale = alone.abs().max().double_value(&[]);
            let err = (&together - &alone).abs().max().double_value(&[]);
            assert!(err <= scale / 128.0, "{q:?} {out}: {err} of {scale}");
        }
    }

    /// Weights that int4 holds exactly (`(q - 8) * scale + zero` per group of inputs, each
    /// group reaching 0 and 15): the packed layer computes their fp32 matmul, at every group
    /// size, over a few rows (the kernel) and many (dequantized) alike.
    #[test]
    fn int4_linear_computes_the_matmul_of_its_weights() {
        tch::manual_seed(2);
        let (out, inp) = (64, 256);
        for group_size in Quantization::INT4_GROUP_SIZES {
            let g = group_size as i64;
            let groups = inp / g;
            let q = integers(out * groups, g, 0, 15);
            let _ = q.narrow(1, 0, 1).fill_(0.0);
            let _ = q.narrow(1, 1, 1).fill_(15.0);
            let scales = integers(out * groups, 1, 1, 64) / 1024.0;
            let zeros = integers(out * groups, 1, -16, 16) / 64.0;
            let w = ((&q - 8.0) * &scales + &zeros).view([out, inp]);
            let q = Quantization::Int4 { group_size };
            let linear = Linear::quantized(&w, None, q).unwrap();
            assert!(matches!(
                linear,
                Linear::Int4 {
                    unpackable: true,
                    ..
                }
            ));
            for x in inputs_both_ways(inp) {
                let reference = x
                    .to_kind(Kind::BFloat16)
                    .to_kind(Kind::Float)
                    .linear::<Tensor>(&w, None);
                assert_close(&linear.forward(&x), &reference);
            }
        }
    }

    /// On ordinary (Gaussian) weights, each quantization stays within its rounding of the
    /// fp32 layer, int4 further than int8; a layer whose inputs int4's groups do not divide is
    /// refused by name.
    #[test]
    fn quantized_linears_approximate_the_full_one() {
        tch::manual_seed(3);
        let w = Tensor::randn([128, 256], (Kind::Float, Device::Cpu)) * 0.05;
        let x = Tensor::randn([8, 256], (Kind::Float, Device::Cpu));
        let full = x.linear::<Tensor>(&w, None);
        let error = |q: Quantization| {
            let y = Linear::quantized(&w, None, q).unwrap().forward(&x);
            let e = (&y - &full)
                .square()
                .mean(Kind::Float)
                .sqrt()
                .double_value(&[]);
            e / full.square().mean(Kind::Float).sqrt().double_value(&[])
        };
        let (int8, int4) = (
            error(Quantization::Int8),
            error(Quantization::Int4 { group_size: 32 }),
        );
        assert!(int8 < 0.02, "int8 relative error {int8}");
        assert!(
            int4 < 0.1 && int4 > int8,
            "int4 relative error {int4}, int8 {int8}"
        );
        let odd = Tensor::randn([16, 96], (Kind::Float, Device::Cpu));
        let refused = Linear::quantized(&odd, None, Quantization::Int4 { group_size: 64 });
        assert!(refused
            .err()
            .unwrap()
            .contains("quantization_group_size 64"));
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
