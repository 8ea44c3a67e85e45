//! The paged KV cache. [`KvPool`] is the memory: per layer, a key and a value tensor of
//! `[blocks, block_size, kv_heads, head_dim]` allocated once at load, written at the slots of a
//! step's new positions and gathered block by block for attention (one sequence's blocks, or
//! all the decoding sequences' blocks at once). The scheduler hands the blocks out
//! (`generate::scheduler::BlockPool`, plain Rust): each sequence has a block table (`Vec<u32>`,
//! the blocks holding its positions in order).

use tch::{Device, Kind, Tensor};

/// Every layer's keys and values, in blocks of `block_size` positions.
pub(super) struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl KvPool {
    pub fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        let shape = [
            blocks as i64,
            block_size as i64,
            kv_heads as i64,
            head_dim as i64,
        ];
        let zeros = || Tensor::zeros(shape, (kind, device));
        Self {
            keys: (0..layers).map(|_| zeros()).collect(),
            values: (0..layers).map(|_| zeros()).collect(),
            block_size: block_size as i64,
            kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
        }
    }

    /// Writes a step's new keys and values (`[tokens, kv_heads, head_dim]`) of `layer` at
    /// `slots` (`[tokens]`, each `block * block_size + offset`).
    pub fn write(&mut self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) {
        let flat = [-1, self.kv_heads, self.head_dim];
        // in place through views of the pool; the returned aliases are not needed
        let _ = self.keys[layer].view(flat).index_copy_(0, slots, k);
        let _ = self.values[layer].view(flat).index_copy_(0, slots, v);
    }

    /// The keys and values of `layer` at positions `from..to` of the sequence whose block
    /// table is `blocks` (`[blocks]`, int64), as `[to - from, kv_heads, head_dim]` each.
    pub fn read(&self, layer: usize, blocks: &Tensor, from: i64, to: i64) -> (Tensor, Tensor) {
        let first = from / self.block_size;
        let last = (to - 1) / self.block_size;
        let blocks = blocks.narrow(0, first, last - first + 1);
        let skip = from - first * self.block_size;
        let gather = |pool: &Tensor| {
            pool.index_select(0, &blocks)
                .view([-1, self.kv_heads, self.head_dim])
                .narrow(0, skip, to - from)
        };
        (gather(&self.keys[layer]), gather(&self.values[layer]))
    }

    /// Room for the keys and values of `blocks` blocks, for [`KvPool::gather`] to fill layer
    /// after layer (one allocation per step, not one per layer).
    pub fn gather_room(&self, blocks: i64) -> (Tensor, Tensor) {
        let shape = [blocks, self.block_size, self.kv_heads, self.head_dim];
        let options = (self.keys[0].kind(), self.keys[0].device());
        (Tensor::empty(shape, options), Tensor::empty(shape, options))
    }

    /// The keys and values of `layer` in the blocks of `sequences` block tables of the same
    /// width laid end to end (`blocks`, `[sequences * width]`, int64), copied into `room`
    /// (from [`KvPool::gather_room`] for as many blocks) with one `index_select` each, and
    /// viewed as `[sequences, kv_heads, keys, head_dim]` (`keys` = `width * block_size`).
    pub fn gather(
        &self,
        layer: usize,
        blocks: &Tensor,
        room: &(Tensor, Tensor),
        sequences: i64,
        keys: i64,
    ) -> (Tensor, Tensor) {
        let gather = |pool: &Tensor, into: &Tensor| {
            pool.index_select_out(into, 0, blocks)
                .view([sequences, keys, self.kv_heads, self.head_dim])
                .transpose(1, 2)
        };
        (
            gather(&self.keys[layer], &room.0),
            gather(&self.values[layer], &room.1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_reads_back_what_was_written_across_blocks() {
        let mut pool = KvPool::new(1, 4, 2, 1, 1, Kind::Float, Device::Cpu);
        // a sequence in blocks 3 and 1: positions 0..4 at slots 6, 7, 2, 3
        let table = Tensor::from_slice(&[3i64, 1]);
        let slots = Tensor::from_slice(&[6i64, 7, 2, 3]);
        let k = Tensor::from_slice(&[10.0f32, 11.0, 12.0, 13.0]).view([4, 1, 1]);
        pool.write(0, &slots, &k, &(&k * 2.0));
        let (k, v) = pool.read(0, &table, 1, 4);
        assert_eq!(
            Vec::<f32>::try_from(k.flatten(0, -1)).unwrap(),
            vec![11.0, 12.0, 13.0]
        );
        assert_eq!(
            Vec::<f32>::try_from(v.flatten(0, -1)).unwrap(),
            vec![22.0, 24.0, 26.0]
        );
    }
}
