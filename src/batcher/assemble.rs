//! Stacking items into one tensor per input, and splitting outputs back into items' rows.

use crate::engine::EngineError;
use crate::tensor::{scalar_bytes, HostTensor};

use super::Item;

/// Can `b` share a batch with `a`? Same inputs, dtypes and ranks; equal trailing dimensions
/// unless the input pads.
pub(super) fn compatible(a: &Item, b: &Item, pad_values: &[Option<f64>]) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs
            .iter()
            .zip(&b.inputs)
            .enumerate()
            .all(|(i, (x, y))| {
                x.dtype == y.dtype
                    && x.shape.len() == y.shape.len()
                    && (pad_values.get(i).copied().flatten().is_some()
                        || x.shape[1..] == y.shape[1..])
            })
}

/// One tensor per input: the items' rows in order, variable dimensions padded to the largest,
/// rounded up to the next of `buckets` when given (see [`super::padded_len`]).
pub(super) fn stack(
    items: &[&Item],
    pad_values: &[Option<f64>],
    buckets: &[usize],
) -> Result<Vec<HostTensor>, EngineError> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    if items.len() == 1 && buckets.is_empty() {
        return Ok(first.inputs.clone());
    }
    (0..first.inputs.len())
        .map(|i| {
            let parts: Vec<&HostTensor> = items.iter().map(|it| &it.inputs[i]).collect();
            stack_one(&parts, pad_values.get(i).copied().flatten(), buckets)
        })
        .collect()
}

fn stack_one(
    parts: &[&HostTensor],
    pad: Option<f64>,
    buckets: &[usize],
) -> Result<HostTensor, EngineError> {
    let first = parts[0];
    let rank = first.shape.len();
    let rows: usize = parts.iter().map(|t| t.rows()).sum();
    let mut shape = first.shape.clone();
    shape[0] = rows;
    for (d, size) in shape.iter_mut().enumerate().skip(1) {
        *size = parts.iter().map(|t| t.shape[d]).max().unwrap_or(0);
        if pad.is_some() {
            *size = super::padded_len(buckets, *size);
        }
    }
    let uniform = parts.iter().all(|t| t.shape[1..] == shape[1..]);
    if uniform {
        let mut data = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
        for t in parts {
            data.extend_from_slice(&t.data);
        }
        return HostTensor::new(first.dtype, shape, data)
            .map_err(|e| EngineError::Forward(format!("stacking inputs: {e}")));
    }
    let pad = pad.ok_or_else(|| {
        EngineError::Forward("inputs of different shapes in one batch: a bug".into())
    })?;
    let elem = first.dtype.size();
    let pad_elem = scalar_bytes(first.dtype, pad);
    let total: usize = shape.iter().product();
    let mut data = Vec::with_capacity(total * elem);
    for _ in 0..total {
        data.extend_from_slice(&pad_elem);
    }
    // Copy each innermost line of every part to its place in the padded tensor.
    let dst_strides = strides(&shape);
    let mut row_offset = 0;
    for t in parts {
        let line = *t.shape.last().unwrap_or(&1) * elem;
        let lines = t.data.len().checked_div(line).unwrap_or(0);
        let outer = &t.shape[..rank.saturating_sub(1)];
        let mut index = vec![0usize; outer.len()];
        for l in 0..lines {
            let mut off = 0;
            for (d, &ix) in index.iter().enumerate() {
                let ix = if d == 0 { ix + row_offset } else { ix };
                off += ix * dst_strides[d];
            }
            let off = off * elem;
            data[off..off + line].copy_from_slice(&t.data[l * line..(l + 1) * line]);
            // increment the multi-index over the outer dimensions
            for d in (0..outer.len()).rev() {
                index[d] += 1;
                if index[d] < outer[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        row_offset += t.rows();
    }
    HostTensor::new(first.dtype, shape, data)
        .map_err(|e| EngineError::Forward(format!("padding inputs: {e}")))
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Splits every output into consecutive row ranges, one per item.
pub(super) fn split(
    outputs: &[HostTensor],
    rows: impl Iterator<Item = usize> + Clone,
    total: usize,
) -> Result<Vec<Vec<HostTensor>>, EngineError> {
    for (i, o) in outputs.iter().enumerate() {
        if o.shape.is_empty() || o.shape[0] != total {
            return Err(EngineError::Output(format!(
                "output {i} has shape {:?}; expected a leading batch dimension of {total}",
                o.shape
            )));
        }
    }
    let mut start = 0;
    let mut per_item = Vec::new();
    for n in rows {
        per_item.push(outputs.iter().map(|o| o.slice_rows(start, n)).collect());
        start += n;
    }
    Ok(per_item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn ids(rows: &[&[i64]]) -> Item {
        let len = rows[0].len();
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Item::new(vec![
            HostTensor::from_i64(vec![rows.len(), len], &flat).unwrap()
        ])
    }

    #[test]
    fn stacks_equal_shapes_by_concatenation() {
        let a = ids(&[&[1, 2]]);
        let b = ids(&[&[3, 4], &[5, 6]]);
        let out = stack(&[&a, &b], &[None], &[]).unwrap();
        assert_eq!(out[0].shape, vec![3, 2]);
        assert_eq!(out[0].to_f64_vec(), vec![1., 2., 3., 4., 5., 6.]);
    }

    #[test]
    fn pads_variable_lengths_with_the_pad_value() {
        let a = ids(&[&[1, 2, 3]]);
        let b = ids(&[&[4]]);
        assert!(!compatible(&a, &b, &[None]));
        assert!(compatible(&a, &b, &[Some(0.0)]));
        let out = stack(&[&a, &b], &[Some(9.0)], &[]).unwrap();
        assert_eq!(out[0].shape, vec![2, 3]);
        assert_eq!(out[0].to_f64_vec(), vec![1., 2., 3., 4., 9., 9.]);
    }

    #[test]
    fn pads_inner_dimensions_of_rank_three() {
        let t = |rows, h, w, v: f32| {
            HostTensor::from_f32(vec![rows, h, w], &vec![v; rows * h * w]).unwrap()
        };
        let a = Item::new(vec![t(1, 1, 2, 1.0)]);
        let b = Item::new(vec![t(1, 2, 1, 2.0)]);
        let out = stack(&[&a, &b], &[Some(0.0)], &[]).unwrap();
        assert_eq!(out[0].shape, vec![2, 2, 2]);
        assert_eq!(out[0].to_f64_vec(), vec![1., 1., 0., 0., 2., 0., 2., 0.]);
    }

    #[test]
    fn pads_sequences_up_to_their_bucket_even_alone() {
        let a = ids(&[&[1, 2, 3]]);
        let b = ids(&[&[4]]);
        let out = stack(&[&a, &b], &[Some(0.0)], &[2, 4, 8]).unwrap();
        assert_eq!(out[0].shape, vec![2, 4]);
        assert_eq!(out[0].to_f64_vec(), vec![1., 2., 3., 0., 4., 0., 0., 0.]);
        let alone = stack(&[&b], &[Some(0.0)], &[2, 4, 8]).unwrap();
        assert_eq!(alone[0].to_f64_vec(), vec![4., 0.]);
        // an input that does not pad keeps its shape
        let kept = stack(&[&b], &[None], &[2, 4, 8]).unwrap();
        assert_eq!(kept[0].shape, vec![1, 1]);
    }

    #[test]
    fn dtypes_must_match() {
        let a = Item::new(vec![HostTensor::zeros(DType::Fp32, vec![1, 2])]);
        let b = Item::new(vec![HostTensor::zeros(DType::Fp64, vec![1, 2])]);
        assert!(!compatible(&a, &b, &[Some(0.0)]));
    }

    #[test]
    fn split_checks_the_batch_dimension() {
        let out = HostTensor::from_f32(vec![3, 1], &[1., 2., 3.]).unwrap();
        let parts = split(std::slice::from_ref(&out), [1usize, 2].into_iter(), 3).unwrap();
        assert_eq!(parts[1][0].to_f32_vec(), vec![2., 3.]);
        assert!(split(&[out], [1usize].into_iter(), 1).is_err());
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Stacking items (padding variable lengths) and splitting the result gives each item
        /// its own rows, padding included only past its own length.
        #[test]
        fn stack_then_split_round_trips(lengths in prop::collection::vec((1usize..4, 1usize..6), 1..6)) {
            let items: Vec<Item> = lengths.iter().enumerate().map(|(k, &(rows, len))| {
                let values: Vec<i64> = (0..rows * len).map(|i| (k * 100 + i + 1) as i64).collect();
                Item::new(vec![HostTensor::from_i64(vec![rows, len], &values).unwrap()])
            }).collect();
            let refs: Vec<&Item> = items.iter().collect();
            let stacked = stack(&refs, &[Some(0.0)], &[]).unwrap();
            let total: usize = items.iter().map(Item::rows).sum();
            let width = lengths.iter().map(|l| l.1).max().unwrap();
            prop_assert_eq!(&stacked[0].shape, &vec![total, width]);
            let parts = split(&stacked, items.iter().map(Item::rows), total).unwrap();
            for (item, part) in items.iter().zip(&parts) {
                let (rows, len) = (item.inputs[0].shape[0], item.inputs[0].shape[1]);
                let got = part[0].to_f64_vec();
                let want = item.inputs[0].to_f64_vec();
                for r in 0..rows {
                    prop_assert_eq!(&got[r * width..r * width + len], &want[r * len..(r + 1) * len]);
                    prop_assert!(got[r * width + len..(r + 1) * width].iter().all(|&v| v == 0.0));
                }
            }
        }
    }
}
