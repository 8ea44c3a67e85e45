//! The paged KV cache. [`KvPool`] is the memory: per layer, a key and a value tensor of
//! `[blocks, block_size, kv_heads, head_dim]`, written at the slots of a step's new positions and
//! gathered block by block for attention (one sequence's blocks, or all the decoding sequences'
//! blocks at once). The scheduler hands the blocks out (`generate::scheduler::BlockPool`, plain
//! Rust): each sequence has a block table (`Vec<u32>`, the blocks holding its positions in order).
//!
//! On the CPU each tensor lies in address space of its own, mapped for the pool's largest size
//! but holding memory only where blocks have been written: the pool grows as its blocks are
//! first used, and [`KvPool::release_from`] gives the memory of the blocks above a limit back to
//! the system at once. On a GPU the pool is allocated whole at load.

use tch::{Device, Kind, Tensor};

/// Anonymous memory mapped for one tensor of the pool, unmapped when dropped.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by one pool; the pool is used from one thread at a
// time (the scheduler's), and only its tensors read and write it.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize) -> Option<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Self { ptr, len })
    }

    /// Gives the memory of bytes `from..` back (the pages read as zeros again when touched).
    fn release_from(&self, from: usize) {
        let page = page_size();
        let from = from.div_ceil(page) * page;
        if from < self.len {
            // SAFETY: a page-aligned range inside this mapping; its contents are not needed
            // (the blocks there are free), and the mapping stays valid.
            unsafe {
                libc::madvise(
                    self.ptr.cast::<u8>().add(from).cast(),
                    self.len - from,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the tensors over it are dropped
        // before (they are fields declared before the mappings in `KvPool`).
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

/// Every layer's keys and values, in blocks of `block_size` positions.
pub(super) struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: i64,
    kv_heads: i64,
    head_dim: i64,
    /// Bytes of one block in one tensor.
    block_bytes: usize,
    /// The memory under `keys` and `values` on the CPU, after them so that it outlives them;
    /// empty on a GPU.
    mappings: Vec<Mapping>,
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
    ) -> Result<Self, String> {
        let shape = [
            blocks as i64,
            block_size as i64,
            kv_heads as i64,
            head_dim as i64,
        ];
        let block_bytes = block_size * kv_heads * head_dim * kind.elt_size_in_bytes();
        let mut mappings = Vec::new();
        let mut tensor = || -> Result<Tensor, String> {
            if device != Device::Cpu {
                return Ok(Tensor::zeros(shape, (kind, device)));
            }
            let len = blocks * block_bytes;
            let map = Mapping::new(len)
                .ok_or_else(|| format!("cannot map {len} bytes for the KV cache"))?;
            // SAFETY: the mapping holds `len` bytes, zeroed, aligned to a page, for exactly
            // this shape and kind; it outlives the tensor (see `mappings`).
            let t = unsafe {
                Tensor::f_from_blob(map.ptr.cast::<u8>(), &shape, &[], kind, Device::Cpu)
            }
            .map_err(|e| format!("cannot place the KV cache: {e}"))?;
            mappings.push(map);
            Ok(t)
        };
        let keys = (0..layers)
            .map(|_| tensor())
            .collect::<Result<Vec<_>, _>>()?;
        let values = (0..layers)
            .map(|_| tensor())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            keys,
            values,
            block_size: block_size as i64,
            kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
            block_bytes,
            mappings,
        })
    }

    /// Whether the pool holds memory only for the blocks written (the CPU), so that it grows
    /// with use and can give memory back.
    pub fn grows(&self) -> bool {
        !self.mappings.is_empty()
    }

    /// Gives the memory of blocks `blocks..` back (they must be free: their contents are lost).
    pub fn release_from(&self, blocks: usize) {
        for m in &self.mappings {
            m.release_from(blocks * self.block_bytes);
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
        let mut pool = KvPool::new(1, 4, 2, 1, 1, Kind::Float, Device::Cpu).unwrap();
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

    #[test]
    fn released_blocks_lose_their_memory_and_the_others_keep_theirs() {
        // blocks of 1024 floats (4 KiB, a page each)
        let mut pool = KvPool::new(1, 4, 1024, 1, 1, Kind::Float, Device::Cpu).unwrap();
        assert!(pool.grows());
        let slots = Tensor::from_slice(&[0i64, 3 * 1024]);
        let k = Tensor::from_slice(&[5.0f32, 7.0]).view([2, 1, 1]);
        pool.write(0, &slots, &k, &k);
        pool.release_from(2);
        let (k, _) = pool.read(0, &Tensor::from_slice(&[0i64, 3]), 0, 2048);
        let k = Vec::<f32>::try_from(k.flatten(0, -1)).unwrap();
        assert_eq!((k[0], k[1024]), (5.0, 0.0));
    }
}
