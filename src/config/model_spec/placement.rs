//! Where a model's instances run (`device`) and the precision its weights are cast to.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tensor::DType;

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
pub struct Placement(pub(super) Vec<DeviceSpec>);

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
