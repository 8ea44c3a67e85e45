//! `model.toml`: what a model is, where its files are, where it runs and how it is batched.
//!
//! This module parses and checks what every kind shares. The kind's own tables (`[image]`,
//! `[text]`, `[output]`, `[[inputs]]`, ...) are kept as they were written, in
//! [`ModelSpec::tables`], for the kind's code to read: the kind step
//! (`crate::registry::spec`) fills in what the kind decides (the signature, labels, token
//! batching, channels-last). Config knows no kind.

mod batching;
mod placement;
mod signature;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::batching::{BatchingSpec, TokenBatching, VersionPolicy, DEFAULT_MAX_BATCH_TOKENS};
pub use self::placement::{DeviceSpec, Placed, Placement, Precision};
pub use self::signature::{Signature, TensorSpec};

/// The raw `model.toml` as written by the user: what every kind shares, and the rest (the
/// kind's tables) kept aside.
#[derive(Debug, Clone, Deserialize)]
struct RawSpec {
    kind: String,
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
    /// Everything else: the kind's own tables, checked by the kind.
    #[serde(flatten)]
    tables: toml::Table,
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

/// A model specification with every shared path resolved and every shared default filled in.
/// After the kind step it also holds what the model's kind decided: its signature, labels,
/// token batching and memory format.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    /// The kind, as model.toml names it (`image-classifier`, ...).
    pub kind: String,
    pub description: Option<String>,
    /// The model file (TorchScript).
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
    /// Feed 4-D inputs in channels-last memory format; `None`: the kind's default (the kind
    /// step sets it), else no.
    pub channels_last: Option<bool>,
    pub batching: BatchingSpec,
    /// Text models: token-budget batching, length grouping and padding buckets (set by the
    /// kind step from the kind's maximum text length).
    pub token_batching: Option<TokenBatching>,
    pub version_policy: VersionPolicy,
    /// The labels its outputs score, for kinds that answer labels (set by the kind step).
    pub labels: Vec<String>,
    /// Its input tensors (set by the kind step: declared, or the kind's defaults).
    pub inputs: Vec<TensorSpec>,
    /// Its output tensors (set by the kind step).
    pub outputs: Vec<TensorSpec>,
    /// The kind's own tables of model.toml, as written (`[image]`, `[[inputs]]`, ...).
    pub tables: toml::Table,
    /// The folder of model.toml and the version folder its relative files resolve against.
    config_dir: PathBuf,
    files_dir: PathBuf,
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

    /// Whether 4-D inputs go channels-last.
    pub fn channels_last(&self) -> bool {
        self.channels_last.unwrap_or(false)
    }

    /// Its signature.
    pub fn signature(&self) -> Signature {
        Signature::new(self.inputs.clone(), self.outputs.clone())
    }

    /// A file named in model.toml: a relative one is looked up in the version folder first,
    /// then beside model.toml.
    pub fn resolve(&self, file: &Path) -> PathBuf {
        resolve(&self.config_dir, &self.files_dir, file)
    }

    /// Reads `config` (a model.toml); relative files in it resolve against `files_dir`.
    pub fn load(name: &str, config: &Path, files_dir: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(config).map_err(|source| SpecError::Read {
            path: config.to_path_buf(),
            source,
        })?;
        Self::parse(name, &text, config, files_dir)
    }

    /// Parses the text of a model.toml found at `config`: what every kind shares.
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

        Ok(ModelSpec {
            name: name.to_string(),
            kind: raw.kind,
            description: raw.description,
            file: resolve(config_dir, files_dir, &raw.file),
            device: raw.device,
            precision: raw.precision,
            instances: raw.instances,
            intra_op_threads: raw.intra_op_threads,
            pinned: raw.pinned,
            channels_last: raw.channels_last,
            batching: raw.batching,
            token_batching: None,
            version_policy: raw.version_policy,
            labels: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            tables: raw.tables,
            config_dir: config_dir.to_path_buf(),
            files_dir: files_dir.to_path_buf(),
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
    fn shared_settings_are_checked_and_the_kinds_tables_kept() {
        let s = parse("kind = \"anything\"\n[image]\nwidth = 3").unwrap();
        assert_eq!(s.kind, "anything");
        assert_eq!(s.file, PathBuf::from("/repo/m/model.pt"));
        assert!(s.tables.contains_key("image"));
        assert!(s.inputs.is_empty() && s.token_batching.is_none());
        let e = parse("kind = \"regressor\"\n[batching]\nmax_batch_size = 0")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/repo/m/model.toml") && e.contains("max_batch_size"),
            "{e}"
        );
        let e = parse("kind = \"regressor\"\ninstances = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("instances"), "{e}");
        assert!(parse("device = \"cpu\"").is_err(), "kind is required");
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
}
