//! A checkpoint's tensors, read from its safetensors files (`model.safetensors`, or the shards
//! `model.safetensors.index.json` names) through a memory map, one tensor at a time: each is
//! cast from the map straight into a libtorch tensor of the model's precision (one copy) and
//! moved to its device, and its pages of the map are dropped at once, so that loading never
//! holds more than the weights and one tensor's pages.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

/// The single-file checkpoint and the index of a sharded one.
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Tensors a checkpoint may carry that the decoder recomputes: older Llama checkpoints saved
/// the rotary embedding's `inv_freq` buffers.
const RECOMPUTED: &str = "rotary_emb.inv_freq";

/// One safetensors file, mapped, its header read.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where the tensors' data starts in the file (after the 8-byte length and the header).
    data_start: usize,
    metadata: Metadata,
}

/// An open checkpoint: every tensor's file known, none read yet.
pub(super) struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name to its shard.
    names: HashMap<String, usize>,
    /// Names read so far, to find those nothing read.
    taken: HashSet<String>,
    kind: Kind,
    device: Device,
}

impl Checkpoint {
    /// Maps the checkpoint's files in `dir`; tensors will come back as `kind` on `device`.
    pub fn open(dir: &Path, kind: Kind, device: Device) -> Result<Self, String> {
        let index = dir.join(INDEX);
        let (files, names): (Vec<String>, Vec<(String, String)>) = if index.is_file() {
            let weight_map = read_index(&index)?;
            let mut files: Vec<String> = weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, weight_map.into_iter().collect())
        } else if dir.join(SINGLE).is_file() {
            (vec![SINGLE.to_string()], Vec::new())
        } else {
            return Err(format!("no {SINGLE} or {INDEX} in {}", dir.display()));
        };
        let shards = files
            .iter()
            .map(|f| Shard::open(&dir.join(f)))
            .collect::<Result<Vec<_>, _>>()?;
        let names = if names.is_empty() {
            let only = &shards[0].metadata;
            only.tensors().into_keys().map(|n| (n, 0)).collect()
        } else {
            names
                .into_iter()
                .map(|(name, file)| {
                    let at = files.binary_search(&file).expect("bug: a shard not listed");
                    (name, at)
                })
                .collect()
        };
        Ok(Self {
            shards,
            names,
            taken: HashSet::new(),
            kind,
            device,
        })
    }

    /// Whether the checkpoint has the tensor.
    pub fn has(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Counts a tensor as used without reading it (an `lm_head.weight` that a tied model
    /// replaces with the embeddings, as transformers does).
    pub fn skip(&mut self, name: &str) {
        self.taken.insert(name.to_string());
    }

    /// Reads tensor `name`, which must have `shape`, as the model's kind on its device.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, String> {
        let &at = self
            .names
            .get(name)
            .ok_or_else(|| format!("the checkpoint has no tensor {name}"))?;
        let shard = &self.shards[at];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| format!("{} has no tensor {name}", shard.path.display()))?;
        if info.shape != shape {
            return Err(format!(
                "{name} has shape {:?}, the config calls for {shape:?}",
                info.shape
            ));
        }
        let stored = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            other => return Err(format!("{name} is stored as {other:?}, not a float type")),
        };
        let (start, end) = info.data_offsets;
        let (start, end) = (shard.data_start + start, shard.data_start + end);
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let bytes = &shard.map[start..end];
        let place = |t: Tensor| {
            t.f_to_device(self.device)
                .map_err(|e| format!("cannot place {name}: {e}"))
        };
        let tensor = if (bytes.as_ptr() as usize).is_multiple_of(stored.elt_size_in_bytes()) {
            // SAFETY: `bytes` holds the tensor's elements (safetensors checked the offsets
            // against the shape and dtype), aligned for them, and outlives the view, which is
            // only read: the cast with copy makes a tensor of its own from it at once.
            let view =
                unsafe { Tensor::f_from_blob(bytes.as_ptr(), &dims, &[], stored, Device::Cpu) };
            place(
                view.and_then(|v| v.f_to_dtype(self.kind, false, true))
                    .map_err(|e| format!("cannot read {name}: {e}"))?,
            )?
        } else {
            // unaligned data (a header not padded to 8 bytes) is copied out first
            let copied = Tensor::f_from_data_size(bytes, &dims, stored)
                .and_then(|t| t.f_to_dtype(self.kind, false, false))
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            place(copied)?
        };
        // SAFETY: a read-only shared map of a file only read here: the dropped pages are read
        // again from the file on the next touch, with the same bytes.
        unsafe {
            // only residency is lost if this fails; the load goes on
            let _ = shard
                .map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
        }
        self.taken.insert(name.to_string());
        Ok(tensor)
    }

    /// Fails on tensors nothing read: a weight the config does not call for (a bias where
    /// the config says none) would otherwise be left out of the computation unnoticed.
    pub fn finish(self) -> Result<(), String> {
        let mut unused: Vec<&String> = self
            .names
            .keys()
            .filter(|n| !self.taken.contains(*n) && !n.ends_with(RECOMPUTED))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let more = unused.len().saturating_sub(3);
        let listed: Vec<&str> = unused.iter().take(3).map(|s| s.as_str()).collect();
        Err(format!(
            "the checkpoint has tensors the config does not call for: {}{}",
            listed.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ))
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let file = File::open(path).map_err(|e| err(&e))?;
        // SAFETY: the map is only read; a checkpoint rewritten while it loads is the user's
        // race, as with any reader of the file.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(&e))?;
        // read ahead: the tensors are read front to back
        let _ = map.advise(Advice::Sequential);
        let (header, metadata) = SafeTensors::read_metadata(&map).map_err(|e| err(&e))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header,
            metadata,
        })
    }
}

/// `weight_map` of a sharded checkpoint's index: tensor name to file name.
fn read_index(path: &Path) -> Result<HashMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let index: Index =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(f) = index
        .weight_map
        .values()
        .find(|f| f.contains('/') || f.contains('\\'))
    {
        return Err(format!(
            "{}: shard {f} is outside the folder",
            path.display()
        ));
    }
    Ok(index.weight_map)
}
