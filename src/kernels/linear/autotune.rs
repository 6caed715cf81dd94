//! Choosing a cuBLASLt algorithm by measurement (`--matmul-autotune`): the device-independent
//! part, so the CPU tests cover it. The CUDA side (`cublaslt.rs`) asks the heuristic for its top
//! candidates once per matmul shape, runs each, and hands the outcomes here; the choice is then
//! cached for the process, so a shape's algorithm never changes after its first call.
//!
//! Batch independence: a sample's rows must come out the same whichever bucket (row count M) it
//! runs in, and each M is tuned on its own. Algorithms that split K (split-K, any reduction
//! scheme) sum a dot product in another order, so they are never candidates; and a candidate is
//! only eligible when its output equals, bit for bit on the sampled rows, that of the first
//! candidate — the heuristic's own choice, which is what ran before tuning existed.

use std::sync::atomic::{AtomicBool, Ordering};

/// How many results to ask cuBLASLt's heuristic for.
pub const HEURISTIC_RESULTS: usize = 32;
/// At most this many eligible candidates are timed.
pub const MAX_CANDIDATES: usize = 16;
/// Timed runs per candidate, after one warm-up run; the median counts.
pub const TIMED_RUNS: usize = 5;
/// Outputs up to this many bytes are compared whole, larger ones by [`SAMPLE_BLOCKS`] blocks.
pub const WHOLE_COMPARE_BYTES: usize = 8 << 20;
/// Row blocks compared in a large output (the first, the last, and evenly between).
pub const SAMPLE_BLOCKS: usize = 8;
/// Rows in each compared block (a few output tiles high).
pub const SAMPLE_ROWS: usize = 256;

static ENABLED: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// Set while this thread runs an exact-size step (`borrowing`).
    static BORROWING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the new matmul shapes it meets taking the algorithm already chosen for the
/// nearest shape of more rows (else fewer) that differs only in M, instead of being timed. An
/// exact-size step (`pipeline::graphs::StepShape::Exact`) meets a new M for almost every row
/// count between two buckets; timing each would stall serving for ≈ 0.1 s a count, and the
/// warm-up tuned the buckets around it on nearly the same problem. The bits do not change:
/// no candidate splits K, and those that do not all sum in one order (module docs). On the
/// calling thread only: an engine drives its device from one thread.
pub fn borrowing<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BORROWING.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(BORROWING.with(|b| b.replace(true)));
    f()
}

/// Whether new shapes on this thread borrow an algorithm (`borrowing`).
pub fn is_borrowing() -> bool {
    BORROWING.with(|b| b.get())
}

/// Among the M of the already-chosen shapes that differ from a new one only in M, the one to
/// borrow from for `m` rows: the fewest rows at or above `m` (the same tiles cover it, on the
/// most similar problem), else the most below it. None when there is none.
pub fn borrowed_m(m: usize, chosen: impl IntoIterator<Item = usize>) -> Option<usize> {
    let (mut above, mut below) = (None::<usize>, None::<usize>);
    for c in chosen {
        if c >= m {
            above = Some(above.map_or(c, |a| a.min(c)));
        } else {
            below = Some(below.map_or(c, |b| b.max(c)));
        }
    }
    above.or(below)
}

/// Turns timing on or off for the shapes not yet seen (`--matmul-autotune`); process-wide, as
/// the algorithm cache is. Off: the heuristic's first algorithm, cached per shape.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What running one candidate gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Trial {
    /// cuBLASLt refused to run it.
    Failed,
    /// It ran, but its output differs from the first candidate's (another reduction order).
    Mismatch,
    /// It ran and matched; the times of its timed runs in milliseconds.
    Timed(Vec<f32>),
}

impl Trial {
    /// The median of the timed runs (the upper middle one for an even count); None unless timed.
    pub fn median_ms(&self) -> Option<f32> {
        let Self::Timed(times) = self else {
            return None;
        };
        let mut t: Vec<f32> = times.iter().copied().filter(|x| x.is_finite()).collect();
        if t.is_empty() {
            return None;
        }
        t.sort_by(f32::total_cmp);
        Some(t[t.len() / 2])
    }
}

/// The index of the fastest timed trial by median; ties go to the earlier one (the heuristic's
/// order). None when no trial was timed.
pub fn pick_fastest(trials: &[Trial]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, trial) in trials.iter().enumerate() {
        if let Some(ms) = trial.median_ms() {
            if best.is_none_or(|(_, b)| ms < b) {
                best = Some((i, ms));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// The row ranges `(start, rows)` of an [m, row_bytes] output compared between candidates: all
/// of it when small, else [`SAMPLE_BLOCKS`] blocks of [`SAMPLE_ROWS`] spread from the first
/// row to the last (split or stream-K tiles tend to sit at the end).
pub fn compared_rows(m: usize, row_bytes: usize) -> Vec<(usize, usize)> {
    if m * row_bytes <= WHOLE_COMPARE_BYTES || m <= SAMPLE_BLOCKS * SAMPLE_ROWS {
        return vec![(0, m)];
    }
    let last = m - SAMPLE_ROWS;
    (0..SAMPLE_BLOCKS)
        .map(|i| (last * i / (SAMPLE_BLOCKS - 1), SAMPLE_ROWS))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(t: &[f32]) -> Trial {
        Trial::Timed(t.to_vec())
    }

    #[test]
    fn a_new_m_borrows_from_the_nearest_larger_shape_else_the_nearest_smaller() {
        let buckets = [256, 16384, 24576, 32768];
        assert_eq!(borrowed_m(31232, buckets), Some(32768));
        assert_eq!(borrowed_m(24576, buckets), Some(24576));
        assert_eq!(borrowed_m(20000, buckets), Some(24576));
        assert_eq!(borrowed_m(40000, buckets), Some(32768));
        assert_eq!(borrowed_m(100, []), None);
    }

    #[test]
    fn borrowing_holds_for_the_closure_only_and_survives_nesting() {
        assert!(!is_borrowing());
        let inner = borrowing(|| {
            let nested = borrowing(is_borrowing);
            (nested, is_borrowing())
        });
        assert_eq!(inner, (true, true));
        assert!(!is_borrowing());
        // Another thread is not affected.
        borrowing(|| {
            assert!(!std::thread::spawn(is_borrowing).join().unwrap());
        });
    }

    #[test]
    fn the_fastest_median_wins() {
        let trials = [
            timed(&[1.0, 1.0, 1.0]),
            timed(&[0.5, 9.0, 0.6]),
            timed(&[0.7, 0.7, 0.7]),
        ];
        assert_eq!(pick_fastest(&trials), Some(1));
        // One slow outlier does not lose a candidate its place, one fast one does not win it.
        let trials = [timed(&[0.8, 0.8, 5.0]), timed(&[0.1, 0.9, 0.9])];
        assert_eq!(pick_fastest(&trials), Some(0));
    }

    #[test]
    fn ties_go_to_the_heuristics_order() {
        let trials = [timed(&[0.5, 0.5]), timed(&[0.5, 0.5]), timed(&[0.5])];
        assert_eq!(pick_fastest(&trials), Some(0));
        let trials = [Trial::Failed, timed(&[0.5]), timed(&[0.5])];
        assert_eq!(pick_fastest(&trials), Some(1));
    }

    #[test]
    fn failures_and_mismatches_never_win() {
        let trials = [timed(&[2.0]), Trial::Failed, Trial::Mismatch, timed(&[1.5])];
        assert_eq!(pick_fastest(&trials), Some(3));
        assert_eq!(pick_fastest(&[Trial::Failed, Trial::Mismatch]), None);
        assert_eq!(pick_fastest(&[]), None);
        // No finite time is no time.
        assert_eq!(pick_fastest(&[timed(&[f32::NAN]), timed(&[3.0])]), Some(1));
        assert_eq!(timed(&[]).median_ms(), None);
    }

    #[test]
    fn the_median_is_the_middle_run() {
        assert_eq!(timed(&[3.0, 1.0, 2.0]).median_ms(), Some(2.0));
        assert_eq!(timed(&[4.0, 1.0, 3.0, 2.0]).median_ms(), Some(3.0));
        assert_eq!(Trial::Mismatch.median_ms(), None);
    }

    #[test]
    fn small_outputs_are_compared_whole() {
        assert_eq!(compared_rows(512, 2304), vec![(0, 512)]);
        assert_eq!(compared_rows(1, 8), vec![(0, 1)]);
        assert_eq!(compared_rows(0, 8), vec![(0, 0)]);
    }

    #[test]
    fn large_outputs_are_sampled_from_first_to_last_row() {
        let (m, row_bytes) = (32768, 9216);
        let blocks = compared_rows(m, row_bytes);
        assert_eq!(blocks.len(), SAMPLE_BLOCKS);
        assert_eq!(blocks[0], (0, SAMPLE_ROWS));
        assert_eq!(*blocks.last().unwrap(), (m - SAMPLE_ROWS, SAMPLE_ROWS));
        for w in blocks.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{blocks:?} overlap");
        }
        let bytes: usize = blocks.iter().map(|(_, r)| r * row_bytes).sum();
        assert!(bytes < m * row_bytes / 8);
    }
}
