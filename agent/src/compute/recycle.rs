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
use std::sync::{Mutex, MutexGuard};

use super::lock;

/// Buffers smaller than this (in floats) are not kept: zeroing 64 KB costs less than a lock.
const MIN_FLOATS: usize = 1 << 14;

/// Items kept oldest first, within bounds on their number and on their floats: this module's
/// buffers, and Winograd's prepared filters.
pub(super) struct Bounded<T> {
    items: Mutex<VecDeque<T>>,
    most: usize,
    floats: usize,
}

impl<T> Bounded<T> {
    pub(super) const fn new(most: usize, floats: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            most,
            floats,
        }
    }

    pub(super) fn items(&self) -> MutexGuard<'_, VecDeque<T>> {
        lock(&self.items)
    }

    /// The bound on floats.
    pub(super) fn floats(&self) -> usize {
        self.floats
    }

    /// Keeps `item` as the newest; the oldest go past the bounds. `floats` sizes an item.
    pub(super) fn keep(&self, item: T, floats: impl Fn(&T) -> usize) {
        let mut items = self.items();
        items.push_back(item);
        let mut total: usize = items.iter().map(&floats).sum();
        while items.len() > self.most || total > self.floats {
            total -= items.pop_front().as_ref().map_or(0, &floats);
        }
    }
}

/// At most 8 buffers and 64 MiB (by capacity): two outputs of the benchmarks' ResNet stem
/// (26 MB each).
static POOL: Bounded<Vec<f32>> = Bounded::new(8, 16 << 20);

/// A buffer of `len` floats with unspecified contents, or an empty one when none is kept:
/// the smallest kept buffer of `len` to `2 * len` floats, cut to `len`.
pub fn take(len: usize) -> Vec<f32> {
    let buffer = POOL.take(len);
    // In tests, old contents are NaN: any element an op leaves unwritten shows in its output.
    #[cfg(test)]
    let buffer = {
        let mut buffer = buffer;
        buffer.fill(f32::NAN);
        buffer
    };
    buffer
}

/// Gives `buffer` back for a later [`take`]; the oldest kept go past the pool's bounds.
pub fn give(buffer: Vec<f32>) {
    POOL.give(buffer);
}

impl Bounded<Vec<f32>> {
    fn take(&self, len: usize) -> Vec<f32> {
        let mut buffers = self.items();
        let fit = (buffers.iter().enumerate())
            .filter(|(_, b)| b.len() >= len && b.capacity() <= len.saturating_mul(2))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut buffer = fit.and_then(|i| buffers.remove(i)).unwrap_or_default();
        buffer.truncate(len);
        buffer
    }

    fn give(&self, buffer: Vec<f32>) {
        if (MIN_FLOATS..=self.floats).contains(&buffer.capacity()) {
            self.keep(buffer, Vec::capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_to_a_take_of_their_size_or_up_to_half_as_large() {
        let (pool, len) = (Bounded::new(8, 1 << 20), MIN_FLOATS * 3);
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

    /// A buffer cut shorter keeps its memory: the bounds count capacity, so that taking ever
    /// shorter outputs from the same buffers cannot hold more than the bound.
    #[test]
    fn the_pool_counts_capacity_and_keeps_its_bounds_dropping_the_oldest() {
        let pool = Bounded::new(3, MIN_FLOATS * 10);
        pool.give(vec![1.0; MIN_FLOATS * 4]);
        pool.give(vec![2.0; MIN_FLOATS * 3]);
        let cut = pool.take(MIN_FLOATS * 2);
        assert_eq!(cut[0], 2.0);
        assert!(cut.capacity() >= MIN_FLOATS * 3);
        pool.give(cut);
        // 4 + 3 (its capacity, not its length) + 4 > 10: the oldest goes.
        pool.give(vec![3.0; MIN_FLOATS * 4]);
        assert!(pool.take(MIN_FLOATS * 4).iter().all(|&v| v == 3.0));
        assert!(
            pool.take(MIN_FLOATS * 4).is_empty(),
            "the oldest was dropped"
        );
        for v in 4..8 {
            pool.give(vec![v as f32; MIN_FLOATS]);
        }
        assert_eq!(pool.items().len(), 3, "at most three");
        assert_eq!(pool.take(MIN_FLOATS)[0], 5.0, "the oldest went first");
        pool.give(vec![9.0; MIN_FLOATS * 10 + 1]);
        assert!(
            pool.take(MIN_FLOATS * 10 + 1).is_empty(),
            "larger than the pool"
        );
    }
}
