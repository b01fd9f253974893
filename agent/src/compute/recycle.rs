//! Output memory given back by those done with it, for the next op of its size to overwrite.
//!
//! Safe Rust hands out no uninitialised memory, so a fresh output is zeroed before the kernel
//! writes it: for the benchmarks' ResNet stem, 26 MB written twice, 8-13% of the call
//! (`docs/benchmarks.md`). onnxruntime's arena and CUDA's caching allocators reuse memory
//! likewise. The pool is small and bounded, keeps only large buffers (small ones cost little
//! to zero) and drops its oldest first; a buffer's old contents never show through, since
//! [`super::conv::forward_into`] writes every element (its tests fill reused buffers with
//! NaN).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::lock;

/// Buffers smaller than this (in floats) are not kept: zeroing 64 KB costs less than a lock.
const MIN_FLOATS: usize = 1 << 14;
/// At most this many buffers...
const MAX_BUFFERS: usize = 8;
/// ...and this many floats (128 MiB) are kept.
const MAX_FLOATS: usize = 32 << 20;

/// Kept buffers, oldest first.
struct Pool(Mutex<VecDeque<Vec<f32>>>);

static POOL: Pool = Pool::new();

/// A buffer of `len` floats with unspecified contents, or an empty one when none is kept:
/// the smallest kept buffer of `len` to `2 * len` floats, cut to `len`.
pub fn take(len: usize) -> Vec<f32> {
    POOL.take(len)
}

/// Gives `buffer` back for a later [`take`]; the oldest kept go past the pool's bounds.
pub fn give(buffer: Vec<f32>) {
    POOL.give(buffer);
}

impl Pool {
    const fn new() -> Self {
        Self(Mutex::new(VecDeque::new()))
    }

    fn take(&self, len: usize) -> Vec<f32> {
        let mut pool = lock(&self.0);
        let fit = (pool.iter().enumerate())
            .filter(|(_, b)| (len..=2 * len).contains(&b.len()))
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        let mut buffer = fit.and_then(|i| pool.remove(i)).unwrap_or_default();
        buffer.truncate(len);
        buffer
    }

    fn give(&self, buffer: Vec<f32>) {
        if buffer.len() < MIN_FLOATS || buffer.len() > MAX_FLOATS {
            return;
        }
        let mut pool = lock(&self.0);
        pool.push_back(buffer);
        let mut floats: usize = pool.iter().map(Vec::len).sum();
        while pool.len() > MAX_BUFFERS || floats > MAX_FLOATS {
            floats -= pool.pop_front().map_or(0, |b| b.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_to_a_take_of_their_size_or_up_to_half_as_large() {
        let (pool, len) = (Pool::new(), MIN_FLOATS * 3);
        pool.give(vec![7.0; len]);
        pool.give(vec![8.0; len + 5]);
        assert!(
            pool.take(len / 2 - 1).is_empty(),
            "more than twice the size asked"
        );
        let reused = pool.take(len - 10);
        assert_eq!(reused, vec![7.0; len - 10], "the smallest that fits, cut");
        assert_eq!(pool.take(len - 10), vec![8.0; len - 10]);
        assert!(pool.take(len - 10).is_empty(), "each taken once");
        pool.give(vec![1.0; MIN_FLOATS - 1]);
        assert!(pool.take(MIN_FLOATS - 1).is_empty(), "too small to keep");
    }

    #[test]
    fn the_pool_keeps_its_bounds_dropping_the_oldest() {
        let pool = Pool::new();
        pool.give(vec![1.0; MIN_FLOATS * 2]);
        for _ in 0..MAX_BUFFERS {
            pool.give(vec![2.0; MIN_FLOATS]);
        }
        assert!(
            pool.take(MIN_FLOATS * 2).is_empty(),
            "the oldest was dropped"
        );
        assert_eq!(lock(&pool.0).len(), MAX_BUFFERS);
        pool.give(vec![3.0; MAX_FLOATS / 2]);
        pool.give(vec![4.0; MAX_FLOATS / 2]);
        let floats: usize = lock(&pool.0).iter().map(Vec::len).sum();
        assert!(floats <= MAX_FLOATS, "{floats} floats kept");
        assert_eq!(
            floats, MAX_FLOATS,
            "the small ones went, the two halves stay"
        );
        pool.give(vec![5.0; MAX_FLOATS + 1]);
        assert!(pool.take(MAX_FLOATS + 1).is_empty(), "larger than the pool");
    }
}
