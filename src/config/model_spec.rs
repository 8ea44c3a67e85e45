//! `model.toml`: what a model is, where its files are, how it is batched and how its inputs and
//! outputs are encoded. Parsed and validated here; nothing else reads the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tensor::DType;

/// What kind of model this is: the names model.toml may give. What each kind means (its
/// tensors, how its requests are decoded and answered) is its file's business under
/// `src/codec/kinds/` ([`crate::codec::kinds::registration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Encoded images or pixel arrays in, per-label scores out.
    ImageClassifier,
    /// Strings in (tokenised with `tokenizer.json`), per-label scores out.
    TextClassifier,
    /// Strings in, one vector each out (pooled and normalised as `[embedding]` says).
    TextEmbedding,
    /// (query, document) pairs in, a relevance score each out (a cross-encoder).
    Reranker,
    /// Number arrays in, number arrays out.
    Regressor,
    /// Raw tensors in and out, mapped one to one to the TorchScript signature.
    Tensor,
}

impl fmt::Display for ModelKind {
    /// The kind as model.toml spells it (`image-classifier`, ...).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(name)) => f.write_str(&name),
            _ => Err(fmt::Error),
        }
    }
}

/// Where a model's instances run (one entry of model.toml's `device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Every visible CUDA device, instances spread round-robin; the CPU when there is none.
    Auto,
    Cpu,
    /// One CUDA device.
    Cuda(usize),
    /// Every visible CUDA device, instances spread round-robin (`cuda`); an error without one.
    AnyCuda,
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::AnyCuda => f.write_str("cuda"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::AnyCuda),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("unknown device '{s}' (expected auto, cpu, cuda or cuda:N)")
                }),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// model.toml's `device`: one device for every instance, or a list that pins instance `i` to
/// entry `i` (cycling when there are more instances than entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement(Vec<DeviceSpec>);

impl Placement {
    pub fn one(device: DeviceSpec) -> Self {
        Self(vec![device])
    }

    /// Where engine instance `index` runs when `gpus` CUDA devices are visible: a listed
    /// device is taken as it is (and must exist); `cuda` and `auto` take the visible GPUs in
    /// turn from GPU `start`, so N instances spread round-robin over them; `auto` without a
    /// GPU is the CPU.
    pub fn instance(&self, index: usize, gpus: usize, start: usize) -> Result<Placed, String> {
        let spec = self.0[index % self.0.len()];
        match spec {
            DeviceSpec::Cpu => Ok(Placed::Cpu),
            DeviceSpec::Auto if gpus == 0 => Ok(Placed::Cpu),
            DeviceSpec::Auto | DeviceSpec::AnyCuda if gpus > 0 => {
                // the instances that take turns over the GPUs: those this entry holds
                Ok(Placed::Cuda((start + index / self.0.len()) % gpus))
            }
            DeviceSpec::Cuda(n) if n < gpus => Ok(Placed::Cuda(n)),
            _ => Err(format!("{spec} asked for, {gpus} CUDA device(s) visible")),
        }
    }

    /// The devices of instances `0..instances`, in order.
    pub fn instances(
        &self,
        instances: usize,
        gpus: usize,
        start: usize,
    ) -> Result<Vec<Placed>, String> {
        (0..instances)
            .map(|i| self.instance(i, gpus, start))
            .collect()
    }
}

impl fmt::Display for Placement {
    /// As model.toml spells it: `cuda`, or `["cuda:0", "cuda:1"]` for a list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                let names: Vec<String> = many.iter().map(|d| format!("\"{d}\"")).collect();
                write!(f, "[{}]", names.join(", "))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Placement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Placement;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a device (auto, cpu, cuda, cuda:N) or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Placement, E> {
                s.parse().map(Placement::one).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Placement, A::Error> {
                let mut devices = Vec::new();
                while let Some(d) = seq.next_element::<DeviceSpec>()? {
                    devices.push(d);
                }
                if devices.is_empty() {
                    return Err(serde::de::Error::custom(
                        "device list is empty (name at least one device)",
                    ));
                }
                Ok(Placement(devices))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A device one engine instance runs on, resolved against the visible GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Placed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placed::Cpu => f.write_str("cpu"),
            Placed::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The floating-point precision a model's weights and floating inputs are cast to once at
/// load (model.toml's `precision`); its floating outputs are answered as FP32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    /// The tensor type of its weights and floating inputs.
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::Fp32,
            Precision::Fp16 => DType::Fp16,
            Precision::Bf16 => DType::Bf16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Dynamic batching settings (Triton's `dynamic_batching` block).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSpec {
    /// Largest number of rows in one forward pass; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for the batch to fill, in milliseconds.
    /// 0 (the default, as in Triton) dispatches as soon as an instance is free; batches still
    /// form under load from requests that queue while the instances compute.
    pub max_queue_delay_ms: f64,
    /// Requests (rows) that may wait; beyond this new requests are refused with 503 at once.
    pub queue_capacity: usize,
    /// Default deadline of one request, queueing and compute, in milliseconds.
    pub timeout_ms: u64,
    /// A p99 latency budget in milliseconds: when set, the batch cap and the queue delay are
    /// tuned at run time to stay within it (bounded by max_batch_size and max_queue_delay_ms).
    pub latency_target_ms: Option<f64>,
    /// Text models: most padded tokens (rows x padded sequence length) in one batch; 0 turns
    /// the budget off. Default [`DEFAULT_MAX_BATCH_TOKENS`].
    pub max_batch_tokens: Option<usize>,
    /// Text models: the sequence lengths a batch is padded up to. Default: 16, 24, 32, 48, 64,
    /// 96, ... below `text.max_length`, and `max_length` itself; `[]` pads to the longest text.
    pub sequence_buckets: Option<Vec<usize>>,
    /// Text models: form batches of texts of similar length (the oldest queued text always
    /// goes into the next batch). Default true.
    pub group_by_length: Option<bool>,
}

/// The default token budget of a text model's batch: text-embeddings-inference's default.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16_384;

/// How a text model's batches are formed and padded (model.toml's `[batching]`, resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenBatching {
    /// Most padded tokens in one batch (0: no budget).
    pub max_batch_tokens: usize,
    /// Sequence lengths batches are padded up to, ascending, the last `max_length`; empty: the
    /// longest text of the batch.
    pub sequence_buckets: Vec<usize>,
    pub group_by_length: bool,
}

impl TokenBatching {
    /// The model.toml settings for a model whose texts are at most `max_length` tokens.
    fn resolve(b: &BatchingSpec, max_length: usize) -> Result<Self, String> {
        let sequence_buckets = match &b.sequence_buckets {
            None => default_buckets(max_length),
            Some(v) if v.is_empty() => Vec::new(),
            Some(v) => {
                if v.contains(&0) || v.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("batching.sequence_buckets must be positive and ascending".into());
                }
                let mut v: Vec<usize> = v.iter().copied().filter(|&n| n < max_length).collect();
                v.push(max_length);
                v
            }
        };
        Ok(Self {
            max_batch_tokens: b.max_batch_tokens.unwrap_or(DEFAULT_MAX_BATCH_TOKENS),
            sequence_buckets,
            group_by_length: b.group_by_length.unwrap_or(true),
        })
    }
}

/// 16, 24, 32, 48, 64, 96, ... (powers of two and halfway between) below `max_length`, then
/// `max_length`: a text is padded by less than half its length, and a 256-token model has 9
/// shapes per batch size.
fn default_buckets(max_length: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(16usize), |n| n.checked_mul(2))
        .flat_map(|n| [n, n + n / 2])
        .take_while(|&n| n < max_length)
        .collect();
    v.push(max_length);
    v
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay_ms: 0.0,
            queue_capacity: 1024,
            timeout_ms: 30_000,
            latency_target_ms: None,
            max_batch_tokens: None,
            sequence_buckets: None,
            group_by_length: None,
        }
    }
}

impl BatchingSpec {
    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_secs_f64(self.max_queue_delay_ms / 1000.0)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn latency_target(&self) -> Option<Duration> {
        self.latency_target_ms
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }
}

/// Which of the versions on disk are served (Triton's `version_policy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    /// The `n` highest version numbers.
    Latest(usize),
    /// Exactly these versions (those present on disk).
    Specific(Vec<u64>),
    /// Every version on disk.
    All(bool),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve among those `available` (ascending).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest(n) => {
                let skip = available.len().saturating_sub(*n);
                available[skip..].to_vec()
            }
            VersionPolicy::Specific(wanted) => available
                .iter()
                .copied()
                .filter(|v| wanted.contains(v))
                .collect(),
            VersionPolicy::All(true) => available.to_vec(),
            VersionPolicy::All(false) => Vec::new(),
        }
    }
}

/// Image pre-processing: decoded images are converted to RGB (or grey), resized to
/// `width` x `height` (stretched, or the shorter side scaled to `resize_to` and the centre
/// cropped, as torchvision's `Resize` + `CenterCrop`), then each channel becomes
/// `(pixel * scale - mean) / std`, laid out CHW.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub width: u32,
    pub height: u32,
    #[serde(default = "default_channels")]
    pub channels: usize,
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    #[serde(default)]
    pub resize: Resize,
    /// With `resize = "shorter-side"`: the shorter side's length after resizing (default: the
    /// larger of `width` and `height`).
    #[serde(default)]
    pub resize_to: Option<u32>,
    #[serde(default)]
    pub crop: Crop,
    #[serde(default)]
    pub interpolation: Interpolation,
}

/// How a decoded image reaches the model's input size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resize {
    /// Straight to `width` x `height`, aspect ratio not kept.
    #[default]
    Stretch,
    /// The shorter side to `resize_to`, aspect ratio kept (torchvision's `Resize(n)`).
    ShorterSide,
}

/// What is cut from the resized image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Crop {
    #[default]
    None,
    /// The centre `width` x `height` (torchvision's `CenterCrop`).
    Center,
}

/// The resampling filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    #[default]
    Bilinear,
    Nearest,
    Bicubic,
}

fn default_channels() -> usize {
    3
}
fn default_scale() -> f32 {
    1.0 / 255.0
}

impl ImageSpec {
    pub fn mean(&self) -> Vec<f32> {
        self.mean
            .clone()
            .unwrap_or_else(|| vec![0.0; self.channels])
    }
    pub fn std(&self) -> Vec<f32> {
        self.std.clone().unwrap_or_else(|| vec![1.0; self.channels])
    }
}

/// Text pre-processing with a Hugging Face `tokenizer.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    /// Longer inputs are truncated to this many tokens, by the tokenizer (special tokens such
    /// as `[CLS]` and `[SEP]` are kept).
    pub max_length: usize,
    /// Token id that pads shorter sequences in a batch; default: the tokenizer's own pad id
    /// (its `padding` section, else its `[PAD]` or `<pad>` token), else 0.
    #[serde(default)]
    pub pad_id: Option<i64>,
}

/// How a `text-embedding` model's output becomes one vector per text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise the vector.
    #[serde(default)]
    pub normalize: bool,
}

/// Pooling over a model's token states `[N, T, H]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The model already returns one vector per text, `[N, H]`.
    #[default]
    None,
    /// The mean of the states of real (unpadded) tokens.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

fn default_tokenizer() -> PathBuf {
    PathBuf::from("tokenizer.json")
}

/// How classifier outputs are reported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// A file with one label per line, beside model.toml (instead of `labels`).
    #[serde(default)]
    pub labels_file: Option<PathBuf>,
    /// Apply softmax to the model's output (set when the model returns logits).
    #[serde(default)]
    pub softmax: bool,
    /// Independent labels: a sigmoid per label instead of a softmax over them.
    #[serde(default)]
    pub multi_label: bool,
}

/// One input or output tensor of the model's signature, without the batch dimension.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DType,
    /// Dimensions after the batch dimension; -1 marks a variable one.
    pub dims: Vec<i64>,
    /// Value used to pad variable dimensions when requests of different sizes share a batch.
    /// Without it, only requests of equal shape are batched together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_value: Option<f64>,
}

/// The raw `model.toml` as written by the user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    kind: ModelKind,
    #[serde(default = "default_file")]
    file: PathBuf,
    #[serde(default = "default_device")]
    device: Placement,
    #[serde(default)]
    precision: Precision,
    #[serde(default = "default_instances")]
    instances: usize,
    #[serde(default)]
    intra_op_threads: usize,
    #[serde(default)]
    pinned: bool,
    #[serde(default)]
    channels_last: Option<bool>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    batching: BatchingSpec,
    #[serde(default)]
    version_policy: VersionPolicy,
    #[serde(default)]
    image: Option<ImageSpec>,
    #[serde(default)]
    text: Option<TextSpec>,
    #[serde(default)]
    embedding: Option<EmbeddingSpec>,
    #[serde(default)]
    output: OutputSpec,
    #[serde(default)]
    inputs: Option<Vec<TensorSpec>>,
    #[serde(default)]
    outputs: Option<Vec<TensorSpec>>,
}

fn default_file() -> PathBuf {
    PathBuf::from("model.pt")
}
fn default_device() -> Placement {
    Placement::one(DeviceSpec::Auto)
}
fn default_instances() -> usize {
    1
}

/// A validated model specification with every path resolved and every default filled in.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub kind: ModelKind,
    pub description: Option<String>,
    /// The TorchScript file.
    pub file: PathBuf,
    /// Where its instances run.
    pub device: Placement,
    /// The precision its weights and floating inputs are cast to at load.
    pub precision: Precision,
    /// Engine instances (OS threads, each with its own copy of the module).
    pub instances: usize,
    /// libtorch intra-op threads per instance; 0: the cores shared out between the instances.
    pub intra_op_threads: usize,
    /// Never evicted to make room in the memory budget; loaded at start-up under lazy model
    /// control.
    pub pinned: bool,
    /// Feed 4-D inputs in channels-last memory format (default: yes for image classifiers).
    pub channels_last: bool,
    pub batching: BatchingSpec,
    /// Text models: token-budget batching, length grouping and padding buckets.
    pub token_batching: Option<TokenBatching>,
    pub version_policy: VersionPolicy,
    pub image: Option<ImageSpec>,
    pub text: Option<TextSpec>,
    /// `text-embedding` models: pooling and normalisation.
    pub embedding: EmbeddingSpec,
    pub labels: Vec<String>,
    pub softmax: bool,
    /// Classifiers: a sigmoid per label instead of a softmax.
    pub multi_label: bool,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A model.toml that cannot be used, with the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ModelSpec {
    /// Where its engine instance `index` runs when `gpus` CUDA devices are visible. Models
    /// placed on `cuda` or `auto` start their round-robin at a GPU chosen by their name (a
    /// stable hash), so that single-instance models spread over the GPUs rather than all
    /// landing on the first; a reload lands where the model was.
    pub fn instance_device(&self, index: usize, gpus: usize) -> Result<Placed, String> {
        let start = self.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.device
            .instance(index, gpus, (start % gpus.max(1) as u64) as usize)
    }

    /// Reads `config` (a model.toml); relative files in it resolve against `files_dir`.
    pub fn load(name: &str, config: &Path, files_dir: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(config).map_err(|source| SpecError::Read {
            path: config.to_path_buf(),
            source,
        })?;
        Self::parse(name, &text, config, files_dir)
    }

    /// Parses the text of a model.toml found at `config`.
    pub fn parse(
        name: &str,
        text: &str,
        config: &Path,
        files_dir: &Path,
    ) -> Result<Self, SpecError> {
        let invalid = |message: String| SpecError::Invalid {
            path: config.to_path_buf(),
            message,
        };
        let raw: RawSpec = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let config_dir = config.parent().unwrap_or(Path::new("."));

        let labels = match (&raw.output.labels, &raw.output.labels_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "set either output.labels or output.labels_file, not both".into(),
                ))
            }
            (Some(l), None) => l.clone(),
            (None, Some(f)) => {
                let path = resolve(config_dir, files_dir, f);
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        invalid(format!("cannot read labels file {}: {e}", path.display()))
                    })?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            }
            (None, None) if crate::codec::kinds::registration(raw.kind).classifier => {
                id2label(config_dir, files_dir, &raw.file).map_err(invalid)?
            }
            (None, None) => Vec::new(),
        };

        let b = &raw.batching;
        if b.max_batch_size == 0 {
            return Err(invalid("batching.max_batch_size must be at least 1".into()));
        }
        if b.queue_capacity == 0 {
            return Err(invalid("batching.queue_capacity must be at least 1".into()));
        }
        if !(b.max_queue_delay_ms.is_finite() && b.max_queue_delay_ms >= 0.0) {
            return Err(invalid(
                "batching.max_queue_delay_ms must be a non-negative number".into(),
            ));
        }
        if let VersionPolicy::Latest(0) = raw.version_policy {
            return Err(invalid("version_policy.latest must be at least 1".into()));
        }
        if let Some(t) = b.latency_target_ms {
            if !(t.is_finite() && t > 0.0) {
                return Err(invalid(
                    "batching.latency_target_ms must be a positive number".into(),
                ));
            }
        }
        if raw.instances == 0 {
            return Err(invalid("instances must be at least 1".into()));
        }

        let token_batching = match &raw.text {
            Some(t) => Some(TokenBatching::resolve(b, t.max_length).map_err(invalid)?),
            None if b.max_batch_tokens.is_some()
                || b.sequence_buckets.is_some()
                || b.group_by_length.is_some() =>
            {
                return Err(invalid(
                    "batching.max_batch_tokens, sequence_buckets and group_by_length apply to text models (with a [text] table)".into(),
                ))
            }
            None => None,
        };

        let file = resolve(config_dir, files_dir, &raw.file);
        let (inputs, outputs) = signature(&raw, &labels, &file).map_err(invalid)?;
        let mut text_spec = raw.text.clone();
        if let Some(t) = &mut text_spec {
            t.tokenizer = resolve(config_dir, files_dir, &t.tokenizer);
        }

        Ok(ModelSpec {
            name: name.to_string(),
            kind: raw.kind,
            description: raw.description,
            file,
            device: raw.device,
            precision: raw.precision,
            instances: raw.instances,
            intra_op_threads: raw.intra_op_threads,
            pinned: raw.pinned,
            channels_last: raw
                .channels_last
                .unwrap_or(crate::codec::kinds::registration(raw.kind).images),
            batching: raw.batching,
            token_batching,
            version_policy: raw.version_policy,
            image: raw.image,
            text: text_spec,
            embedding: raw.embedding.unwrap_or_default(),
            labels,
            softmax: raw.output.softmax,
            multi_label: raw.output.multi_label,
            inputs,
            outputs,
        })
    }
}

/// A relative file is looked up in the version folder first, then beside model.toml.
fn resolve(config_dir: &Path, files_dir: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        return file.to_path_buf();
    }
    let in_files = files_dir.join(file);
    if in_files.exists() || files_dir == config_dir {
        in_files
    } else {
        config_dir.join(file)
    }
}

/// What model.toml says that a kind's registration ([`crate::codec::kinds::registration`])
/// turns into the model's tensors: its own tables, and the declared tensors if any.
#[derive(Debug, Clone, Copy)]
pub struct Declared<'a> {
    pub kind: ModelKind,
    pub image: Option<&'a ImageSpec>,
    pub text: Option<&'a TextSpec>,
    pub labels: &'a [String],
    pub inputs: Option<&'a [TensorSpec]>,
    pub outputs: Option<&'a [TensorSpec]>,
    /// Pooling of a text-embedding model (the default when model.toml has no [embedding]).
    pub pooling: Pooling,
    /// The TorchScript file (resolved; it may not exist yet).
    pub model_file: &'a Path,
}

impl TensorSpec {
    /// A tensor of the given name, type and dims, without padding.
    pub fn new(name: &str, datatype: DType, dims: Vec<i64>) -> Self {
        Self {
            name: name.into(),
            datatype,
            dims,
            pad_value: None,
        }
    }
}

/// The model's tensor signature: what its kind derives from model.toml, then the checks every
/// kind shares.
fn signature(
    raw: &RawSpec,
    labels: &[String],
    model_file: &Path,
) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), String> {
    let registration = crate::codec::kinds::registration(raw.kind);
    if !registration.takes_embedding && raw.embedding.is_some() {
        return Err(format!(
            "[embedding] is for kind text-embedding, not {}",
            raw.kind
        ));
    }
    let crate::codec::Signature { inputs, outputs } = (registration.declare)(&Declared {
        kind: raw.kind,
        image: raw.image.as_ref(),
        text: raw.text.as_ref(),
        labels,
        inputs: raw.inputs.as_deref(),
        outputs: raw.outputs.as_deref(),
        pooling: raw.embedding.unwrap_or_default().pooling,
        model_file,
    })?;
    if inputs.is_empty() || outputs.is_empty() {
        return Err("a model needs at least one input and one output".into());
    }
    for t in inputs.iter().chain(&outputs) {
        if t.dims.iter().any(|&d| d == 0 || d < -1) {
            return Err(format!(
                "tensor '{}': dims must be positive or -1 (variable), got {:?}",
                t.name, t.dims
            ));
        }
    }
    for (i, t) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("input name '{}' appears twice", t.name));
        }
    }
    Ok((inputs, outputs))
}

/// Labels from `id2label` in a Hugging Face `config.json` beside the model file, when there is
/// one; none otherwise.
fn id2label(config_dir: &Path, files_dir: &Path, model_file: &Path) -> Result<Vec<String>, String> {
    let model = resolve(config_dir, files_dir, model_file);
    let path = model.parent().unwrap_or(config_dir).join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(map) = config.get("id2label").and_then(|m| m.as_object()) else {
        return Ok(Vec::new());
    };
    let mut labels = vec![None; map.len()];
    for (id, label) in map {
        let i: usize = id
            .parse()
            .ok()
            .filter(|&i| i < labels.len())
            .ok_or_else(|| {
                format!(
                    "{}: id2label has id '{id}'; ids are 0..{}",
                    path.display(),
                    labels.len()
                )
            })?;
        labels[i] = Some(label.as_str().unwrap_or_default().to_string());
    }
    labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.ok_or_else(|| format!("{}: id2label lacks id {i}", path.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec, SpecError> {
        ModelSpec::parse(
            "m",
            text,
            Path::new("/repo/m/model.toml"),
            Path::new("/repo/m"),
        )
    }

    #[test]
    fn text_models_get_token_batching_with_buckets_up_to_max_length() {
        assert_eq!(
            default_buckets(256),
            vec![16, 24, 32, 48, 64, 96, 128, 192, 256]
        );
        assert_eq!(default_buckets(100), vec![16, 24, 32, 48, 64, 96, 100]);
        assert_eq!(default_buckets(8), vec![8]);
        let b = BatchingSpec {
            sequence_buckets: Some(vec![10, 40, 500]),
            ..Default::default()
        };
        let t = TokenBatching::resolve(&b, 128).unwrap();
        assert_eq!(t.sequence_buckets, vec![10, 40, 128]);
        assert_eq!(t.max_batch_tokens, DEFAULT_MAX_BATCH_TOKENS);
        assert!(t.group_by_length);
        for bad in [vec![0, 8], vec![16, 16], vec![32, 16]] {
            let b = BatchingSpec {
                sequence_buckets: Some(bad),
                ..Default::default()
            };
            assert!(TokenBatching::resolve(&b, 128).is_err());
        }
    }

    #[test]
    fn image_classifier_defaults() {
        let s = parse(
            r#"kind = "image-classifier"
               [image]
               width = 64
               height = 32
               [output]
               labels = ["a", "b"]"#,
        )
        .unwrap();
        assert_eq!(s.file, PathBuf::from("/repo/m/model.pt"));
        assert_eq!(s.inputs[0].dims, vec![3, 32, 64]);
        assert_eq!(s.outputs[0].dims, vec![2]);
        assert_eq!(s.batching.max_batch_size, 32);
        assert_eq!(s.device, Placement::one(DeviceSpec::Auto));
        assert_eq!(s.precision, Precision::Fp32);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = parse("kind = \"image-classifier\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/repo/m/model.toml"), "{e}");
        assert!(e.contains("[image]"), "{e}");
        let e = parse("kind = \"nonsense\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant"), "{e}");
        let e = parse("kind = \"regressor\"\nunknown_key = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown_key"), "{e}");
        let e = parse("kind = \"regressor\"\n[batching]\nmax_batch_size = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_batch_size"), "{e}");
    }

    #[test]
    fn version_policies_select_versions() {
        let s = parse("kind = \"regressor\"\n[version_policy]\nlatest = 2").unwrap();
        assert_eq!(s.version_policy.select(&[1, 3, 7]), vec![3, 7]);
        let s = parse("kind = \"regressor\"\n[version_policy]\nspecific = [1, 7, 9]").unwrap();
        assert_eq!(s.version_policy.select(&[1, 3, 7]), vec![1, 7]);
        let s = parse("kind = \"regressor\"\n[version_policy]\nall = true").unwrap();
        assert_eq!(s.version_policy.select(&[1, 3]), vec![1, 3]);
        assert_eq!(
            parse("kind = \"regressor\"")
                .unwrap()
                .version_policy
                .select(&[1, 3]),
            vec![3]
        );
        assert!(parse("kind = \"regressor\"\n[version_policy]\nlatest = 0").is_err());
    }

    #[test]
    fn devices_parse() {
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::AnyCuda);
        assert!("gpu".parse::<DeviceSpec>().is_err());
        let s = parse("kind = \"regressor\"\ndevice = [\"cuda:1\", \"cuda:0\"]").unwrap();
        assert_eq!(
            s.device,
            Placement(vec![DeviceSpec::Cuda(1), DeviceSpec::Cuda(0)])
        );
        assert_eq!(s.device.to_string(), "[\"cuda:1\", \"cuda:0\"]");
        let e = parse("kind = \"regressor\"\ndevice = []")
            .unwrap_err()
            .to_string();
        assert!(e.contains("device list is empty"), "{e}");
        let e = parse("kind = \"regressor\"\ndevice = [\"cuda:0\", \"tpu\"]");
        assert!(e.is_err());
    }

    #[test]
    fn instances_spread_round_robin_over_the_visible_gpus() {
        let devices = |placement: &str, instances: usize, gpus: usize| {
            let s = parse(&format!("kind = \"regressor\"\ndevice = {placement}")).unwrap();
            s.device
                .instances(instances, gpus, 0)
                .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        // `cuda` and `auto`: the instances take the visible GPUs in turn
        assert_eq!(
            devices("\"cuda\"", 5, 2).unwrap(),
            ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
        );
        assert_eq!(
            devices("\"auto\"", 3, 4).unwrap(),
            ["cuda:0", "cuda:1", "cuda:2"]
        );
        assert_eq!(devices("\"auto\"", 2, 0).unwrap(), ["cpu", "cpu"]);
        let e = devices("\"cuda\"", 2, 0).unwrap_err();
        assert!(e.contains("0 CUDA device(s) visible"), "{e}");
        // a list pins instance i to entry i, cycling
        assert_eq!(
            devices("[\"cuda:1\", \"cuda:0\"]", 3, 2).unwrap(),
            ["cuda:1", "cuda:0", "cuda:1"]
        );
        assert_eq!(
            devices("[\"cpu\", \"cuda:0\"]", 2, 1).unwrap(),
            ["cpu", "cuda:0"]
        );
        let e = devices("[\"cuda:0\", \"cuda:3\"]", 2, 2).unwrap_err();
        assert!(
            e.contains("cuda:3 asked for, 2 CUDA device(s) visible"),
            "{e}"
        );
        // `cuda` inside a list: the instances that entry holds take the GPUs in turn
        assert_eq!(
            devices("[\"cpu\", \"cuda\"]", 4, 2).unwrap(),
            ["cpu", "cuda:0", "cpu", "cuda:1"]
        );
        assert_eq!(devices("\"cuda:1\"", 2, 2).unwrap(), ["cuda:1", "cuda:1"]);
        // a round-robin starts where it is told
        let s = parse("kind = \"regressor\"\ndevice = \"cuda\"").unwrap();
        let from_2: Vec<String> = s
            .device
            .instances(3, 3, 2)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(from_2, ["cuda:2", "cuda:0", "cuda:1"]);
    }

    #[test]
    fn single_instance_models_spread_over_the_gpus_by_name() {
        let on = |name: &str| {
            let text = "kind = \"regressor\"\ndevice = \"cuda\"";
            let s =
                ModelSpec::parse(name, text, Path::new("/m/model.toml"), Path::new("/m")).unwrap();
            // the same name lands on the same GPU every time
            assert_eq!(s.instance_device(0, 4), s.instance_device(0, 4));
            s.instance_device(0, 4).unwrap()
        };
        let used: std::collections::BTreeSet<String> = (0..16)
            .map(|i| on(&format!("model-{i}")).to_string())
            .collect();
        assert!(used.len() >= 3, "16 models used only {used:?}");
    }

    #[test]
    fn precision_parses_and_defaults_to_fp32() {
        for (text, want) in [
            ("fp32", Precision::Fp32),
            ("fp16", Precision::Fp16),
            ("bf16", Precision::Bf16),
        ] {
            let s = parse(&format!("kind = \"regressor\"\nprecision = \"{text}\"")).unwrap();
            assert_eq!(s.precision, want);
            assert_eq!(s.precision.to_string(), text);
        }
        let e = parse("kind = \"regressor\"\nprecision = \"int8\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn text_kinds_take_token_inputs_by_name() {
        let text = "[text]\nmax_length = 16\n";
        let emb = |extra: &str| {
            parse(&format!(
                "kind = \"text-embedding\"\n{extra}\n{text}\n[[outputs]]\nname = \"h\"\ndatatype = \"FP32\"\ndims = [-1, 8]\n[embedding]\npooling = \"mean\""
            ))
        };
        let s = emb("").unwrap();
        let names: Vec<&str> = s.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask"]);
        assert_eq!(s.embedding.pooling, Pooling::Mean);
        let e = emb("[[inputs]]\nname = \"pixels\"\ndatatype = \"INT64\"\ndims = [-1]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("input_ids"), "{e}");
        // pooling none takes a vector, not token states
        let e = parse(&format!(
            "kind = \"text-embedding\"\n{text}\n[[outputs]]\nname = \"h\"\ndatatype = \"FP32\"\ndims = [-1, 8]"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("[hidden]"), "{e}");
        let e = parse(&format!("kind = \"text-embedding\"\n{text}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[[outputs]]"), "{e}");
        // a reranker gets a one-logit output; [embedding] is not for it
        let s = parse(&format!("kind = \"reranker\"\n{text}")).unwrap();
        assert_eq!(s.outputs[0].dims, vec![1]);
        assert!(parse(&format!(
            "kind = \"reranker\"\n{text}\n[embedding]\nnormalize = true"
        ))
        .is_err());
        // a classifier needs labels from somewhere
        let e = parse(&format!("kind = \"text-classifier\"\n{text}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("id2label"), "{e}");
    }

    #[test]
    fn undeclared_token_inputs_are_read_from_the_torchscript_forward() {
        use crate::config::torchscript::tests::archive;
        let forward = |args: &str| {
            format!("class M(Module):\n  def forward(self: __torch__.M,\n    {args}) -> Tensor:\n    pass\n")
        };
        let spec_for = |args: &str| {
            let file = archive("__torch__", "M", &forward(args));
            let parsed = parse(&format!(
                "kind = \"reranker\"\nfile = \"{}\"\n[text]\nmax_length = 16\n",
                file.display()
            ));
            std::fs::remove_file(&file).unwrap();
            parsed
        };
        let names =
            |s: &ModelSpec| -> Vec<String> { s.inputs.iter().map(|i| i.name.clone()).collect() };
        // the forward's order, whatever it is
        let s =
            spec_for("token_type_ids: Tensor,\n    input_ids: Tensor,\n    attention_mask: Tensor")
                .unwrap();
        assert_eq!(names(&s), ["token_type_ids", "input_ids", "attention_mask"]);
        // an argument with a default may be left to the model
        let s = spec_for("input_ids: Tensor,\n    position_ids: Optional[Tensor]=None").unwrap();
        assert_eq!(names(&s), ["input_ids"]);
        // names that say nothing (tch's traces): the kind's default
        let s = spec_for("argument_1: Tensor").unwrap();
        assert_eq!(names(&s), ["input_ids", "attention_mask"]);
        // an argument the tokenizer cannot fill, or none it can: refused, saying why
        let e = spec_for("input_ids: Tensor,\n    pixel_values: Tensor")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'pixel_values' is not one of"), "{e}");
        let e = spec_for("x: Tensor").unwrap_err().to_string();
        assert!(e.contains("forward takes none of"), "{e}");
    }

    #[test]
    fn labels_come_from_id2label_in_config_json() {
        let dir = std::env::temp_dir().join(format!("aiaas-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"id2label": {"1": "yes", "0": "no"}}"#,
        )
        .unwrap();
        let toml = "kind = \"text-classifier\"\n[text]\nmax_length = 8";
        let s = ModelSpec::parse("m", toml, &dir.join("model.toml"), &dir).unwrap();
        assert_eq!(s.labels, ["no", "yes"]);
        std::fs::write(
            dir.join("config.json"),
            r#"{"id2label": {"0": "a", "2": "c"}}"#,
        )
        .unwrap();
        assert!(ModelSpec::parse("m", toml, &dir.join("model.toml"), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_resize_modes_are_checked() {
        let img = |extra: &str| {
            parse(&format!(
                "kind = \"image-classifier\"\n[image]\nwidth = 224\nheight = 224\n{extra}\n[output]\nlabels = [\"a\"]"
            ))
        };
        let s = img("resize = \"shorter-side\"\nresize_to = 256\ncrop = \"center\"\ninterpolation = \"bicubic\"").unwrap();
        let i = s.image.unwrap();
        assert_eq!(
            (i.resize, i.crop, i.resize_to),
            (Resize::ShorterSide, Crop::Center, Some(256))
        );
        assert_eq!(i.interpolation, Interpolation::Bicubic);
        assert!(img("crop = \"center\"").is_err());
        assert!(img("resize = \"shorter-side\"").is_err());
        assert!(img("resize = \"shorter-side\"\nresize_to = 100\ncrop = \"center\"").is_err());
        assert!(img("interpolation = \"lanczos\"").is_err());
    }

    #[test]
    fn tensor_kind_needs_a_signature() {
        assert!(parse("kind = \"tensor\"").is_err());
        let s = parse(
            r#"kind = "tensor"
               [[inputs]]
               name = "a"
               datatype = "INT32"
               dims = [-1]
               pad_value = 0
               [[outputs]]
               name = "b"
               datatype = "FP64"
               dims = [2]"#,
        )
        .unwrap();
        assert_eq!(s.inputs[0].datatype, DType::Int32);
        assert_eq!(s.inputs[0].pad_value, Some(0.0));
    }
}
