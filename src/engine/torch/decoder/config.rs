//! A Hugging Face checkpoint's `config.json` read into what the decoder computes with: the family
//! (from `architectures`, else `model_type`), the shapes, the norms' epsilon, the rotary
//! embedding and its scaling, and each family's switches (biases, q/k norms, sliding windows).
//! Anything the decoder cannot compute exactly as transformers does is a load error naming it,
//! never a guess.

use serde::{Deserialize, Deserializer};

/// A model family the decoder implements: one generic transformer with per-family switches
/// (see [`DecoderConfig`]), since the four differ only in biases, q/k norms and windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM2, TinyLlama).
    Llama,
    /// `MistralForCausalLM`: Llama with a sliding attention window.
    Mistral,
    /// `Qwen2ForCausalLM`: biased q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm over each head of q and k, an explicit head size.
    Qwen3,
}

const FAMILIES: &[(Family, &str, &str)] = &[
    (Family::Llama, "LlamaForCausalLM", "llama"),
    (Family::Mistral, "MistralForCausalLM", "mistral"),
    (Family::Qwen2, "Qwen2ForCausalLM", "qwen2"),
    (Family::Qwen3, "Qwen3ForCausalLM", "qwen3"),
];

impl Family {
    fn supported() -> String {
        FAMILIES.iter().map(|f| f.1).collect::<Vec<_>>().join(", ")
    }
}

/// Llama 3.1's rotary scaling (`rope_type: llama3`): low frequencies divided by `factor`, high
/// ones kept, the band between interpolated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// What the decoder computes with, read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    /// `lm_head` is `embed_tokens` (also when the checkpoint has no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2 always; the others per `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (`attention_bias` outside Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP's projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before the rotation (Qwen3).
    pub qk_norm: bool,
    /// Each layer's attention window: a position attends to the last `w` positions, itself
    /// included; `None`: to all before it.
    pub windows: Vec<Option<usize>>,
}

/// `config.json` as written, every field the decoder may read.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    /// Absent and `null` differ: Mistral's default window is 4096, `null` is none.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (earlier checkpoints).
#[derive(Debug, Default, Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    partial_rotary_factor: Option<f64>,
}

/// A field that is present, `null` included: `Some(None)` for `null`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl DecoderConfig {
    /// Reads `config.json`'s text; the error says what is missing or unsupported.
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(json).map_err(|e| format!("config.json: {e}"))?;
        let family = family(&raw)?;
        let need = |v: Option<usize>, key: &str| {
            v.filter(|&n| n > 0)
                .ok_or_else(|| format!("config.json has no positive {key}"))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        // transformers' defaults where the key is absent: they differ by family
        let num_kv_heads = match (raw.num_key_value_heads, family) {
            (Some(n), _) => n,
            (None, Family::Llama) => num_heads,
            (None, Family::Mistral) => 8,
            (None, Family::Qwen2 | Family::Qwen3) => 32,
        };
        let head_dim = match (raw.head_dim, family) {
            (Some(n), _) => n,
            (None, Family::Qwen3) => 128,
            (None, _) => hidden_size / num_heads,
        };
        if num_kv_heads == 0 || head_dim == 0 || num_heads % num_kv_heads != 0 {
            return Err(format!(
                "{num_heads} attention heads cannot share {num_kv_heads} key/value heads of size {head_dim}"
            ));
        }
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} is odd: rotary embeddings rotate pairs"
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(format!("hidden_act {act} is not supported (only silu)"));
        }
        let max_position_embeddings = need(raw.max_position_embeddings, "max_position_embeddings")?;
        let (rope_theta, rope_scaling) = rope(&raw, max_position_embeddings)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Mistral => (false, false),
            Family::Llama | Family::Qwen3 => (attention_bias, attention_bias),
        };
        Ok(Self {
            family,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: family == Family::Llama && raw.mlp_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            windows: windows(&raw, family, num_layers)?,
        })
    }
}

/// The family from `architectures` (its first entry), else from `model_type`.
fn family(raw: &RawConfig) -> Result<Family, String> {
    if let Some(arch) = raw.architectures.as_ref().and_then(|a| a.first()) {
        return FAMILIES
            .iter()
            .find(|f| f.1 == arch)
            .map(|f| f.0)
            .ok_or_else(|| {
                format!(
                    "unsupported architecture {arch} (supported: {})",
                    Family::supported()
                )
            });
    }
    match raw.model_type.as_deref() {
        Some(t) => FAMILIES
            .iter()
            .find(|f| f.2 == t)
            .map(|f| f.0)
            .ok_or_else(|| {
                format!(
                    "unsupported model_type {t} and no architectures (supported: {})",
                    Family::supported()
                )
            }),
        None => Err("config.json names neither architectures nor model_type".into()),
    }
}

/// The rotary base and scaling, as transformers standardises them: `rope_scaling` if set, else
/// `rope_parameters`; the base from that table, else the top-level `rope_theta`, else 10000.
fn rope(
    raw: &RawConfig,
    max_position_embeddings: usize,
) -> Result<(f64, Option<Llama3Scaling>), String> {
    let empty = RawRope::default();
    let table = raw
        .rope_scaling
        .as_ref()
        .or(raw.rope_parameters.as_ref())
        .unwrap_or(&empty);
    let theta = table.rope_theta.or(raw.rope_theta).unwrap_or(10_000.0);
    let partial = table.partial_rotary_factor.or(raw.partial_rotary_factor);
    if let Some(p) = partial.filter(|&p| p != 1.0) {
        return Err(format!("partial_rotary_factor {p} is not supported"));
    }
    let kind = table
        .rope_type
        .as_deref()
        .or(table.legacy_type.as_deref())
        .unwrap_or("default");
    let scaling = match kind {
        "default" => None,
        "llama3" => {
            let need = |v: Option<f64>, key: &str| {
                v.ok_or_else(|| format!("llama3 rope scaling has no {key}"))
            };
            let scaling = Llama3Scaling {
                factor: need(table.factor, "factor")?,
                low_freq_factor: need(table.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(table.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: table
                    .original_max_position_embeddings
                    .unwrap_or(max_position_embeddings),
            };
            if scaling.high_freq_factor == scaling.low_freq_factor {
                return Err("llama3 rope scaling needs high_freq_factor != low_freq_factor".into());
            }
            Some(scaling)
        }
        other => return Err(format!("rope scaling type {other} is not supported")),
    };
    Ok((theta, scaling))
}

/// Each layer's attention window, as the family's transformers config sets it: Mistral's
/// `sliding_window` (4096 when absent) on every layer; Qwen's only with `use_sliding_window`,
/// on the layers `layer_types` marks (else from `max_window_layers` on).
fn windows(raw: &RawConfig, family: Family, layers: usize) -> Result<Vec<Option<usize>>, String> {
    let window = match family {
        Family::Llama => None,
        Family::Mistral => raw.sliding_window.unwrap_or(Some(4096)),
        Family::Qwen2 | Family::Qwen3 => match raw.use_sliding_window {
            Some(true) => raw.sliding_window.unwrap_or(Some(4096)),
            _ => None,
        },
    };
    if window == Some(0) {
        return Err("sliding_window 0 leaves nothing to attend to".into());
    }
    let sliding = |i: usize| match (family, &raw.layer_types) {
        (Family::Mistral, _) => true,
        (_, Some(types)) => types.get(i).is_some_and(|t| t == "sliding_attention"),
        (_, None) => i >= raw.max_window_layers.unwrap_or(28),
    };
    if let Some(types) = &raw.layer_types {
        if types.len() != layers {
            return Err(format!(
                "layer_types lists {} layers, num_hidden_layers is {layers}",
                types.len()
            ));
        }
        if let Some(t) = types
            .iter()
            .find(|t| *t != "full_attention" && *t != "sliding_attention")
        {
            return Err(format!("layer type {t} is not supported"));
        }
    }
    Ok((0..layers).map(|i| window.filter(|_| sliding(i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<DecoderConfig, String> {
        DecoderConfig::parse(&format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                "max_position_embeddings": 128{extra}}}"#
        ))
    }

    #[test]
    fn architectures_decide_the_family_and_model_type_stands_in_for_them() {
        let c =
            config(r#", "architectures": ["Qwen2ForCausalLM"], "model_type": "llama""#).unwrap();
        assert_eq!(c.family, Family::Qwen2);
        assert!(c.qkv_bias && !c.o_bias);
        let c = config(r#", "architectures": null, "model_type": "llama""#).unwrap();
        assert_eq!((c.family, c.head_dim), (Family::Llama, 16));
        let e = config(r#", "architectures": ["GPT2LMHeadModel"]"#).unwrap_err();
        assert!(
            e.contains("unsupported architecture GPT2LMHeadModel"),
            "{e}"
        );
        let e = config(r#", "model_type": "gpt2""#).unwrap_err();
        assert!(e.contains("unsupported model_type gpt2"), "{e}");
    }

    #[test]
    fn rope_comes_from_either_table_and_unknown_scalings_are_refused() {
        let c = config(r#", "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling.unwrap().original_max_position_embeddings,
            8192
        );
        let c = config(r#", "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}"#).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (100000.0, None));
        let c = config(r#", "model_type": "llama", "rope_scaling": null"#).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, None));
        let e =
            config(r#", "model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4.0}"#)
                .unwrap_err();
        assert!(e.contains("rope scaling type yarn"), "{e}");
    }

    #[test]
    fn windows_follow_each_family() {
        let c = config(r#", "model_type": "mistral""#).unwrap();
        assert_eq!(c.windows, vec![Some(4096); 2]);
        let c = config(r#", "model_type": "mistral", "sliding_window": null"#).unwrap();
        assert_eq!(c.windows, vec![None; 2]);
        let c = config(r#", "model_type": "qwen2", "sliding_window": 8"#).unwrap();
        assert_eq!(c.windows, vec![None; 2]);
        let c = config(r#", "model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1"#).unwrap();
        assert_eq!(c.windows, vec![None, Some(8)]);
    }

    #[test]
    fn absent_key_value_heads_default_as_transformers_does() {
        let json = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256,
            "max_position_embeddings": 128}"#;
        assert_eq!(DecoderConfig::parse(json).unwrap().num_kv_heads, 4);
        let e = DecoderConfig::parse(&json.replace("llama", "mistral")).unwrap_err();
        assert!(e.contains("cannot share 8 key/value heads"), "{e}");
    }

    #[test]
    fn qwen3_keeps_its_explicit_head_size() {
        let c = config(r#", "model_type": "qwen3", "head_dim": 32"#).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.qk_norm), (32, 2, true));
        let e = config(r#", "model_type": "llama", "hidden_act": "gelu""#).unwrap_err();
        assert!(e.contains("gelu"), "{e}");
    }
}
