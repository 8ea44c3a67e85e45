//! Plain host-side tensors: the currency between codec, batcher and engine.
//!
//! A [`HostTensor`] is a dtype, a shape and little-endian row-major bytes. It knows nothing of
//! libtorch; the engine converts it at the last moment. An [`Item`] is one request's tensors on
//! their way to the batcher, an [`Inferred`] its result on the way back.

mod item;

pub use self::item::{Inferred, Item};

use std::fmt;

use serde::{Deserialize, Serialize};

/// Element types a model input or output can have. Names follow the KServe v2 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DType {
    Bool,
    Uint8,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::Bool,
        DType::Uint8,
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::Fp16,
        DType::Bf16,
        DType::Fp32,
        DType::Fp64,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::Uint8 | DType::Int8 => 1,
            DType::Int16 | DType::Fp16 | DType::Bf16 => 2,
            DType::Int32 | DType::Fp32 => 4,
            DType::Int64 | DType::Fp64 => 8,
        }
    }

    /// The KServe v2 datatype name (`FP32`, `INT64`, ...).
    pub fn v2_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::Uint8 => "UINT8",
            DType::Int8 => "INT8",
            DType::Int16 => "INT16",
            DType::Int32 => "INT32",
            DType::Int64 => "INT64",
            DType::Fp16 => "FP16",
            DType::Bf16 => "BF16",
            DType::Fp32 => "FP32",
            DType::Fp64 => "FP64",
        }
    }

    /// Parses a v2 datatype name; `None` for names libtorch cannot hold (UINT16..64, BYTES).
    pub fn from_v2_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.v2_name() == name)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::Fp16 | DType::Bf16 | DType::Fp32 | DType::Fp64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.v2_name())
    }
}

/// A dense tensor in host memory: little-endian, row-major, no padding.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// A tensor whose byte length does not match its shape and dtype.
#[derive(Debug, thiserror::Error)]
#[error("{dtype} tensor of shape {shape:?} needs {expected} bytes, got {actual}")]
pub struct ShapeMismatch {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub expected: usize,
    pub actual: usize,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` holds exactly `shape` elements of `dtype`.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, ShapeMismatch> {
        let expected = byte_len(dtype, &shape);
        match expected {
            Some(expected) if expected == data.len() => Ok(Self { dtype, shape, data }),
            _ => Err(ShapeMismatch {
                dtype,
                expected: expected.unwrap_or(usize::MAX),
                actual: data.len(),
                shape,
            }),
        }
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self, ShapeMismatch> {
        Self::new(DType::Fp32, shape, f32_bytes(values))
    }

    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Result<Self, ShapeMismatch> {
        let mut data = Vec::with_capacity(values.len() * 8);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Self::new(DType::Int64, shape, data)
    }

    /// A tensor of zeros (used for warm-up).
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Self {
        let len = byte_len(dtype, &shape).expect("warm-up shape overflows usize: a bug");
        Self {
            dtype,
            shape,
            data: vec![0; len],
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Leading (batch) dimension; 1 for a scalar.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Bytes in one row (everything after the batch dimension).
    pub fn row_bytes(&self) -> usize {
        self.shape.iter().skip(1).product::<usize>() * self.dtype.size()
    }

    /// Rows `start..start+len` as a new tensor.
    pub fn slice_rows(&self, start: usize, len: usize) -> HostTensor {
        let rb = self.row_bytes();
        let mut shape = self.shape.clone();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] = len;
        HostTensor {
            dtype: self.dtype,
            shape,
            data: self.data[start * rb..(start + len) * rb].to_vec(),
        }
    }

    /// Every element widened to f64 (for JSON output and tests).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let d = &self.data;
        match self.dtype {
            DType::Bool | DType::Uint8 => d.iter().map(|&b| b as f64).collect(),
            DType::Int8 => d.iter().map(|&b| b as i8 as f64).collect(),
            DType::Int16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            DType::Int32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::Int64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::Fp16 => d
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])) as f64)
                .collect(),
            DType::Bf16 => d
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            DType::Fp32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::Fp64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        }
    }

    /// Every element as f32 (lossy for 64-bit types).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            DType::Fp32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => self.to_f64_vec().into_iter().map(|v| v as f32).collect(),
        }
    }
}

impl HostTensor {
    /// Whether every element is finite (always, for integer and boolean tensors).
    pub fn all_finite(&self) -> bool {
        match self.dtype {
            DType::Fp32 => self
                .data
                .chunks_exact(4)
                .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            d if d.is_float() => self.to_f64_vec().iter().all(|v| v.is_finite()),
            _ => true,
        }
    }
}

/// Bytes needed for `shape` elements of `dtype`; `None` on overflow.
pub fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

/// One element of `dtype` holding a value a client sent: refused, saying why, when `dtype`
/// cannot hold it (a fraction or out of range for an integer type, beyond the largest finite
/// float of a float type, anything but 0 or 1 for BOOL) instead of being saturated or turned
/// into infinity. Non-finite values pass for float types (they can only come from binary data).
pub fn checked_scalar_bytes(dtype: DType, value: f64) -> Result<Vec<u8>, String> {
    let int_range = |lo: f64, hi: f64| value.fract() == 0.0 && (lo..=hi).contains(&value);
    let ok = match dtype {
        DType::Bool => value == 0.0 || value == 1.0,
        DType::Uint8 => int_range(0.0, u8::MAX as f64),
        DType::Int8 => int_range(i8::MIN as f64, i8::MAX as f64),
        DType::Int16 => int_range(i16::MIN as f64, i16::MAX as f64),
        DType::Int32 => int_range(i32::MIN as f64, i32::MAX as f64),
        // 2^63 is the first f64 above i64::MAX
        DType::Int64 => value.fract() == 0.0 && (-(2f64.powi(63))..2f64.powi(63)).contains(&value),
        DType::Fp16 => !value.is_finite() || value.abs() <= 65504.0,
        DType::Bf16 => !value.is_finite() || value.abs() <= 3.389_531_389_251_535_5e38,
        DType::Fp32 => !value.is_finite() || value.abs() <= f32::MAX as f64,
        DType::Fp64 => true,
    };
    if ok {
        Ok(scalar_bytes(dtype, value))
    } else if dtype.is_float() {
        Err(format!("{value} is outside {dtype}'s range"))
    } else if dtype == DType::Bool {
        Err(format!("{value} is not a BOOL value (true, false, 0 or 1)"))
    } else {
        Err(format!(
            "{value} is not a {dtype} value (a whole number in its range)"
        ))
    }
}

/// One element of `dtype` holding `value` (rounded or saturated as `as` casts do).
pub fn scalar_bytes(dtype: DType, value: f64) -> Vec<u8> {
    match dtype {
        DType::Bool => vec![(value != 0.0) as u8],
        DType::Uint8 => vec![value as u8],
        DType::Int8 => (value as i8).to_le_bytes().to_vec(),
        DType::Int16 => (value as i16).to_le_bytes().to_vec(),
        DType::Int32 => (value as i32).to_le_bytes().to_vec(),
        DType::Int64 => (value as i64).to_le_bytes().to_vec(),
        DType::Fp16 => f32_to_f16(value as f32).to_le_bytes().to_vec(),
        DType::Bf16 => (((value as f32).to_bits() >> 16) as u16)
            .to_le_bytes()
            .to_vec(),
        DType::Fp32 => (value as f32).to_le_bytes().to_vec(),
        DType::Fp64 => value.to_le_bytes().to_vec(),
    }
}

/// f32 to IEEE half precision (round towards zero; only used for pad values).
pub fn f32_to_f16(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let frac = bits & 0x7f_ffff;
    if exp >= 0x1f {
        sign | 0x7c00 | if v.is_nan() { 0x200 } else { 0 }
    } else if exp <= 0 {
        if exp < -10 {
            sign
        } else {
            sign | (((frac | 0x80_0000) >> (14 - exp)) as u16)
        }
    } else {
        sign | ((exp as u16) << 10) | ((frac >> 13) as u16)
    }
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut data = Vec::with_capacity(values.len() * 4);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    data
}

/// IEEE half precision to f32 (no dependency on a half-float crate for one function).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // subnormal: renormalise
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000,
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_wrong_length() {
        assert!(HostTensor::new(DType::Fp32, vec![2, 3], vec![0; 24]).is_ok());
        let err = HostTensor::new(DType::Fp32, vec![2, 3], vec![0; 23]).unwrap_err();
        assert_eq!(err.expected, 24);
        assert!(HostTensor::new(DType::Fp32, vec![usize::MAX, 2], vec![]).is_err());
    }

    #[test]
    fn slice_rows_takes_the_right_bytes() {
        let t = HostTensor::from_f32(vec![3, 2], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let s = t.slice_rows(1, 2);
        assert_eq!(s.shape, vec![2, 2]);
        assert_eq!(s.to_f32_vec(), vec![3., 4., 5., 6.]);
    }

    #[test]
    fn half_floats_decode() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn scalars_encode() {
        assert_eq!(scalar_bytes(DType::Int64, 7.0), 7i64.to_le_bytes().to_vec());
        assert_eq!(scalar_bytes(DType::Bool, 2.0), vec![1]);
        assert_eq!(f16_to_f32(f32_to_f16(1.5)), 1.5);
        assert_eq!(f16_to_f32(f32_to_f16(-0.25)), -0.25);
    }

    #[test]
    fn v2_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_v2_name(d.v2_name()), Some(d));
        }
        assert_eq!(DType::from_v2_name("UINT32"), None);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn every_half_float_survives_f32_and_back() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f32_to_f16(f), h, "{h:#06x} -> {f}");
        }
    }

    proptest! {
        /// Slicing rows and putting them back together gives the tensor back.
        #[test]
        fn rows_slice_and_rejoin(rows in 1usize..8, cols in 1usize..5, cut in 0usize..8) {
            let cut = cut.min(rows);
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = HostTensor::from_f32(vec![rows, cols], &values).unwrap();
            let (a, b) = (t.slice_rows(0, cut), t.slice_rows(cut, rows - cut));
            let mut joined = a.data.clone();
            joined.extend(&b.data);
            prop_assert_eq!(joined, t.data);
            prop_assert_eq!(a.shape[0] + b.shape[0], rows);
        }
    }
}
