//! The KV pool's blocks as the scheduler hands them out, with the prefix cache.
//!
//! Each sequence has a block table (`Vec<u32>`, the blocks holding its positions in order).
//! A block is *referenced* while tables hold it (a count: sequences sharing a prefix hold the
//! same blocks), *cached* once it is full and its tokens are known (then a later sequence whose
//! tokens begin the same way takes it instead of computing it again), and *free* otherwise.
//! A cached block nobody references stays cached until its room is needed: blocks are taken
//! from the free ones first, then from the cached ones least recently used first.
//!
//! A full block is known by a hash of its tokens chained with the hash of the block before it,
//! so that equal hashes mean equal prefixes. The hash is keyed per pool (SipHash with a random
//! key: a client cannot craft collisions), and a hit is checked against the block's own tokens
//! and its parent's hash anyway, so that a collision can cost a miss but never a wrong answer.
//!
//! The pool's size can change while it serves (the memory budget grows and shrinks it): blocks
//! `0..capacity` exist, the lowest free ones are handed out first so that the top of the pool
//! empties when load falls, and only blocks at the top that no table references can be given
//! back (cached ones among them are dropped from the cache).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};

/// The pool has fewer free blocks than a sequence needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{needed} more KV blocks needed, {free} free")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// A cached block's identity: its hash, its parent's, and its tokens (to check a hit).
#[derive(Debug)]
struct Cached {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

/// A block of a cached prefix, found by [`BlockPool::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub block: u32,
    /// The block's chained hash (the parent of the next block's).
    pub hash: u64,
}

/// The pool's blocks: free ones, references, and the prefix cache.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    /// Blocks `0..capacity` exist.
    capacity: usize,
    /// Blocks neither referenced nor cached, lowest first.
    free: BinaryHeap<Reverse<u32>>,
    /// Tables holding each block.
    refs: Vec<u32>,
    /// Each block's identity while it is cached.
    cached: Vec<Option<Cached>>,
    /// Hash to the cached block holding those tokens.
    by_hash: HashMap<u64, u32>,
    /// Cached blocks no table references, by when they were last released (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Each idle block's key in `idle`.
    idle_since: Vec<u64>,
    clock: u64,
    hasher: RandomState,
    /// Whether full blocks are cached at all.
    caching: bool,
}

/// The hash the chain starts from (the parent of a sequence's first block).
pub const ROOT: u64 = 0x005e_ed0f_b10c;

impl BlockPool {
    /// A pool of `capacity` blocks of `block_size` positions; `caching`: keep full blocks for
    /// later sequences with the same prefix.
    pub fn new(block_size: usize, capacity: usize, caching: bool) -> Self {
        let mut pool = Self {
            block_size,
            capacity: 0,
            free: BinaryHeap::new(),
            refs: Vec::new(),
            cached: Vec::new(),
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: Vec::new(),
            clock: 0,
            hasher: RandomState::new(),
            caching,
        };
        pool.grow(capacity);
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that exist now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks a sequence can take now: free ones and cached ones nobody references.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks referenced by tables.
    pub fn in_use(&self) -> usize {
        self.capacity - self.available()
    }

    /// Blocks in the prefix cache (referenced or not).
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// Blocks that hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// The chained hash of a full block of `tokens` after the block whose hash is `parent`.
    pub fn hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u64(parent);
        for &t in tokens {
            h.write_u32(t);
        }
        h.finish()
    }

    /// The cached blocks that hold the longest prefix of `tokens` in whole blocks, leaving at
    /// least one token to compute (its logits are the next token's). Takes nothing.
    pub fn lookup(&self, tokens: &[u32]) -> Vec<Hit> {
        let mut hits = Vec::new();
        if !self.caching || tokens.is_empty() {
            return hits;
        }
        let mut parent = ROOT;
        for chunk in tokens[..tokens.len() - 1].chunks_exact(self.block_size) {
            let hash = self.hash(parent, chunk);
            let found = self.by_hash.get(&hash).copied().filter(|&b| {
                self.cached[b as usize]
                    .as_ref()
                    .is_some_and(|c| c.parent == parent && *c.tokens == *chunk)
            });
            let Some(block) = found else { break };
            hits.push(Hit { block, hash });
            parent = hash;
        }
        hits
    }

    /// Blocks that taking `hits` removes from [`BlockPool::available`] (those nobody
    /// references yet).
    pub fn idle_among(&self, hits: &[Hit]) -> usize {
        hits.iter()
            .filter(|h| self.refs[h.block as usize] == 0)
            .count()
    }

    /// Appends the cached blocks `hits` (from [`BlockPool::lookup`], nothing changed since)
    /// to `table`, referencing them.
    pub fn share(&mut self, table: &mut Vec<u32>, hits: &[Hit]) {
        for h in hits {
            let b = h.block as usize;
            if self.refs[b] == 0 {
                self.idle.remove(&self.idle_since[b]);
            }
            self.refs[b] += 1;
            table.push(h.block);
        }
    }

    /// Grows `table` to hold `positions` positions; takes nothing when the blocks are short.
    pub fn reserve(&mut self, table: &mut Vec<u32>, positions: usize) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_for(positions).saturating_sub(table.len());
        if needed > self.available() {
            return Err(OutOfBlocks {
                needed,
                free: self.available(),
            });
        }
        for _ in 0..needed {
            let block = self
                .take_one()
                .expect("bug: counted free blocks are missing");
            self.refs[block as usize] = 1;
            table.push(block);
        }
        Ok(())
    }

    /// A block nobody references: the lowest free one, else the least recently used cached
    /// one, dropped from the cache.
    fn take_one(&mut self) -> Option<u32> {
        if let Some(Reverse(b)) = self.free.pop() {
            return Some(b);
        }
        let (_, b) = self.idle.pop_first()?;
        self.uncache(b);
        Some(b)
    }

    fn uncache(&mut self, block: u32) {
        if let Some(c) = self.cached[block as usize].take() {
            self.by_hash.remove(&c.hash);
        }
    }

    /// Gives a table's blocks back, emptying it. The last blocks are released first, so that
    /// among the cached ones a prefix's tail is reused for others before its head.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for block in table.drain(..).rev() {
            let b = block as usize;
            assert!(
                self.refs[b] > 0,
                "bug: KV block {block} given back but not handed out"
            );
            self.refs[b] -= 1;
            if self.refs[b] > 0 {
                continue;
            }
            if self.cached[b].is_some() {
                self.clock += 1;
                self.idle_since[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(Reverse(block));
            }
        }
    }

    /// Caches `block`, full with `tokens` after the block whose hash is `parent`; returns its
    /// hash. Tokens already cached in another block leave this one out of the cache.
    pub fn register(&mut self, block: u32, parent: u64, tokens: &[u32]) -> u64 {
        let hash = self.hash(parent, tokens);
        let b = block as usize;
        if self.caching && self.cached[b].is_none() && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, block);
            self.cached[b] = Some(Cached {
                hash,
                parent,
                tokens: tokens.into(),
            });
        }
        hash
    }

    /// Adds `blocks` blocks at the top of the pool.
    pub fn grow(&mut self, blocks: usize) {
        let from = self.capacity;
        self.capacity += blocks;
        self.refs.resize(self.capacity, 0);
        self.cached.resize_with(self.capacity, || None);
        self.idle_since.resize(self.capacity, 0);
        self.free
            .extend((from..self.capacity).map(|b| Reverse(b as u32)));
    }

    /// Blocks at the top of the pool that no table references: what [`BlockPool::shrink`] can
    /// give back now.
    pub fn unreferenced_top(&self) -> usize {
        self.refs.iter().rev().take_while(|&&r| r == 0).count()
    }

    /// Gives back up to `blocks` blocks from the top of the pool, those no table references
    /// (cached ones are dropped from the cache); returns how many.
    pub fn shrink(&mut self, blocks: usize) -> usize {
        let n = blocks.min(self.unreferenced_top());
        if n == 0 {
            return 0;
        }
        let to = self.capacity - n;
        for b in to..self.capacity {
            if self.cached[b].is_some() {
                self.idle.remove(&self.idle_since[b]);
                self.uncache(b as u32);
            }
        }
        let kept: Vec<Reverse<u32>> = self
            .free
            .drain()
            .filter(|Reverse(b)| (*b as usize) < to)
            .collect();
        self.free = kept.into();
        self.capacity = to;
        self.refs.truncate(to);
        self.cached.truncate(to);
        self.idle_since.truncate(to);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_grow_by_whole_blocks_lowest_first_and_come_back_whole() {
        let mut a = BlockPool::new(4, 5, false);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.reserve(&mut x, 5).unwrap();
        assert_eq!(x, vec![0, 1]);
        a.reserve(&mut x, 8).unwrap();
        assert_eq!(x.len(), 2);
        a.reserve(&mut y, 9).unwrap();
        assert_eq!(y, vec![2, 3, 4]);
        assert_eq!(
            a.reserve(&mut x, 9),
            Err(OutOfBlocks { needed: 1, free: 0 })
        );
        assert_eq!(x.len(), 2);
        a.release(&mut x);
        assert!(x.is_empty());
        a.reserve(&mut y, 13).unwrap();
        assert_eq!(y, vec![2, 3, 4, 0]);
        a.release(&mut y);
        assert_eq!(a.available(), 5);
        assert_eq!(a.cached_blocks(), 0);
    }

    #[test]
    #[should_panic(expected = "given back but not handed out")]
    fn a_block_given_back_twice_is_a_bug() {
        let mut a = BlockPool::new(4, 2, true);
        let mut x = Vec::new();
        a.reserve(&mut x, 1).unwrap();
        let mut copy = x.clone();
        a.release(&mut x);
        a.release(&mut copy);
    }

    /// Registers every full block of `tokens` held by `table`, as the scheduler does.
    fn register_all(pool: &mut BlockPool, table: &[u32], tokens: &[u32]) {
        let mut parent = ROOT;
        for (i, chunk) in tokens.chunks_exact(pool.block_size()).enumerate() {
            parent = pool.register(table[i], parent, chunk);
        }
    }

    #[test]
    fn a_shared_prefix_is_found_in_whole_blocks_and_shared_by_reference() {
        let mut pool = BlockPool::new(4, 8, true);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = Vec::new();
        pool.reserve(&mut a, 10).unwrap();
        register_all(&mut pool, &a, &tokens);
        assert_eq!(pool.cached_blocks(), 2);
        // the same first 8 tokens, then others: two blocks hit
        let other: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
        let hits = pool.lookup(&other);
        assert_eq!(
            hits.iter().map(|h| h.block).collect::<Vec<_>>(),
            a[..2].to_vec()
        );
        // a prompt of exactly 8 tokens hits one block: its last token must be computed
        assert_eq!(pool.lookup(&tokens[..8]).len(), 1);
        // a different first block hits nothing, even with the same second block
        let shifted: Vec<u32> = [7, 1, 2, 3].into_iter().chain(4..12).collect();
        assert!(pool.lookup(&shifted).is_empty());
        let mut b = Vec::new();
        assert_eq!(pool.idle_among(&hits), 0);
        pool.share(&mut b, &hits);
        pool.reserve(&mut b, 11).unwrap();
        assert_eq!(pool.in_use(), 4);
        pool.release(&mut a);
        // the shared blocks are still held by b
        assert_eq!(pool.in_use(), 3);
        pool.release(&mut b);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.available(), 8);
        // and still cached, nobody holding them
        assert_eq!(pool.lookup(&other).len(), 2);
        assert_eq!(pool.idle_among(&pool.lookup(&other)), 2);
    }

    #[test]
    fn free_blocks_go_before_cached_ones_and_cached_ones_least_recently_used_first() {
        let mut pool = BlockPool::new(2, 4, true);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pool.reserve(&mut a, 2).unwrap();
        register_all(&mut pool, &a, &[1, 2]);
        pool.reserve(&mut b, 2).unwrap();
        register_all(&mut pool, &b, &[3, 4]);
        pool.release(&mut b);
        pool.release(&mut a);
        assert_eq!(pool.cached_blocks(), 2);
        // two free blocks are handed out before any cached one
        let mut c = Vec::new();
        pool.reserve(&mut c, 4).unwrap();
        assert_eq!(pool.cached_blocks(), 2);
        // then the one released first ([3, 4]) is evicted, [1, 2] stays
        pool.reserve(&mut c, 6).unwrap();
        assert_eq!(pool.cached_blocks(), 1);
        assert_eq!(pool.lookup(&[1, 2, 0]).len(), 1);
        assert!(pool.lookup(&[3, 4, 0]).is_empty());
    }

    #[test]
    fn a_hash_hit_with_other_tokens_is_a_miss() {
        let mut pool = BlockPool::new(2, 4, true);
        let mut a = Vec::new();
        pool.reserve(&mut a, 2).unwrap();
        // as if a collision had put other tokens under the hash of [1, 2]
        let hash = pool.hash(ROOT, &[1, 2]);
        pool.by_hash.insert(hash, a[0]);
        pool.cached[a[0] as usize] = Some(Cached {
            hash,
            parent: ROOT,
            tokens: vec![5, 6].into(),
        });
        assert!(pool.lookup(&[1, 2, 3]).is_empty());
        assert_eq!(pool.lookup(&[5, 6, 3]).len(), 0);
    }

    #[test]
    fn without_caching_nothing_is_cached() {
        let mut pool = BlockPool::new(2, 4, false);
        let mut a = Vec::new();
        pool.reserve(&mut a, 4).unwrap();
        register_all(&mut pool, &a, &[1, 2, 3, 4]);
        assert_eq!(pool.cached_blocks(), 0);
        assert!(pool.lookup(&[1, 2, 3, 4, 5]).is_empty());
    }

    #[test]
    fn the_pool_grows_and_gives_back_its_unreferenced_top() {
        let mut pool = BlockPool::new(2, 4, true);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pool.reserve(&mut a, 4).unwrap();
        pool.reserve(&mut b, 4).unwrap();
        register_all(&mut pool, &b, &[7, 8, 9, 10]);
        assert_eq!(b, vec![2, 3]);
        assert_eq!(pool.unreferenced_top(), 0);
        pool.grow(4);
        assert_eq!((pool.capacity(), pool.available()), (8, 4));
        pool.release(&mut b);
        // blocks 2..8 are unreferenced; 2 and 3 cached
        assert_eq!(pool.unreferenced_top(), 6);
        assert_eq!(pool.shrink(5), 5);
        assert_eq!(pool.capacity(), 3);
        // block 3 (the cached [9, 10]) went, block 2 ([7, 8]) stays cached
        assert_eq!(pool.cached_blocks(), 1);
        assert_eq!(pool.lookup(&[7, 8, 9, 10, 11]).len(), 1);
        assert_eq!(pool.available(), 1);
        assert_eq!(pool.shrink(5), 1);
        assert_eq!(pool.cached_blocks(), 0);
        assert_eq!(pool.shrink(5), 0);
        // a new table takes what is left and no more
        let mut c = Vec::new();
        assert!(pool.reserve(&mut c, 2).is_err());
        pool.release(&mut a);
        pool.reserve(&mut c, 4).unwrap();
        assert_eq!(c, vec![0, 1]);
    }
}
