//! Admission to the bounded queue when a server holds several models: one capacity
//! (`--max-queue`, in images) shared by every model's queue, with a guaranteed floor each, so
//! that a flood of requests for one model cannot take the queue space another model needs.
//!
//! The policy: each of N models is guaranteed `floor = capacity / (2N)` images of queue space;
//! the other half (and any floor a model is not using) is shared first come, first served.
//! A job of `n` images for model m is admitted iff
//!
//! ```text
//! max(q_m + n, floor_m) + Σ_{k ≠ m} max(q_k, floor_k) ≤ capacity
//! ```
//!
//! where `q_k` is model k's queued images. The sum on the left never exceeds the capacity, so
//! a model below its floor always has room for a job that fits in what is left of its floor,
//! however long the other models' queues are. With one model the floor is 0 and the rule is
//! the plain bound `q + n ≤ capacity`. Queued images leave (to a batch, or cancelled) without
//! the lock: that only lowers the counts, so a check under the lock is never too generous.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::EngineStats;

pub(crate) struct Admission {
    capacity: usize,
    floors: Vec<usize>,
    /// Each model's counters (`queued_images` is its queue, in images).
    models: Vec<Arc<EngineStats>>,
    /// Serialises check-and-reserve across models.
    lock: Mutex<()>,
}

/// A refusal: what the model has queued and the most it could queue right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub queued: usize,
    pub limit: usize,
}

impl Admission {
    pub fn new(capacity: usize, models: Vec<Arc<EngineStats>>) -> Self {
        let n = models.len();
        let floor = if n > 1 { capacity / (2 * n) } else { 0 };
        Self {
            capacity,
            floors: vec![floor; n],
            models,
            lock: Mutex::new(()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The queue space model `m` is guaranteed whatever the others queue.
    pub fn floor(&self, m: usize) -> usize {
        self.floors[m]
    }

    /// The most model `m` can ever have queued: the capacity less the other models' floors.
    pub fn most_for(&self, m: usize) -> usize {
        let others: usize = (0..self.floors.len())
            .filter(|&k| k != m)
            .map(|k| self.floors[k])
            .sum();
        self.capacity - others
    }

    /// Images queued for every model together.
    #[cfg(test)]
    pub fn queued_total(&self) -> usize {
        self.models
            .iter()
            .map(|s| s.queued_images.load(Ordering::SeqCst))
            .sum()
    }

    /// Reserves queue space for `n` images of model `m`, or says why not.
    pub fn reserve(&self, m: usize, n: usize) -> Result<(), Refused> {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let queued: Vec<usize> = self
            .models
            .iter()
            .map(|s| s.queued_images.load(Ordering::SeqCst))
            .collect();
        let held_by_others: usize = (0..queued.len())
            .filter(|&k| k != m)
            .map(|k| queued[k].max(self.floors[k]))
            .sum();
        let limit = self.capacity - held_by_others;
        if (queued[m] + n).max(self.floors[m]) > limit {
            return Err(Refused {
                queued: queued[m],
                limit,
            });
        }
        self.models[m].queued_images.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineStats, Failure};

    fn admission(capacity: usize, models: usize) -> Admission {
        let failure = Arc::new(Failure::default());
        let stats = (0..models)
            .map(|_| Arc::new(EngineStats::new(1, failure.clone())))
            .collect();
        Admission::new(capacity, stats)
    }

    fn release(a: &Admission, m: usize, n: usize) {
        a.models[m].queued_images.fetch_sub(n, Ordering::SeqCst);
    }

    #[test]
    fn one_model_is_bounded_by_the_capacity_alone() {
        let a = admission(10, 1);
        assert_eq!((a.floor(0), a.most_for(0)), (0, 10));
        assert!(a.reserve(0, 10).is_ok());
        assert_eq!(
            a.reserve(0, 1),
            Err(Refused {
                queued: 10,
                limit: 10
            })
        );
        release(&a, 0, 3);
        assert!(a.reserve(0, 3).is_ok());
    }

    #[test]
    fn a_flood_for_one_model_leaves_every_other_its_floor() {
        // 3 models, 60 images: a floor of 10 each, 30 shared.
        let a = admission(60, 3);
        assert_eq!((a.floor(0), a.most_for(0)), (10, 40));
        // Model 0 floods one image at a time until refused: it gets its floor and the shared
        // half, never the others' floors.
        let mut got = 0;
        while a.reserve(0, 1).is_ok() {
            got += 1;
        }
        assert_eq!(got, 40);
        // Models 1 and 2 still get their floors, in one job or several.
        assert!(a.reserve(1, 10).is_ok());
        assert!(a.reserve(2, 4).is_ok() && a.reserve(2, 6).is_ok());
        assert!(
            a.reserve(2, 1).is_err(),
            "beyond its floor, nothing is free"
        );
        assert_eq!(a.queued_total(), 60);
        // When model 0's queue drains, the shared space is free for the others again.
        release(&a, 0, 40);
        assert!(a.reserve(1, 30).is_ok());
        assert!(a.reserve(1, 1).is_err());
        // ... and model 0 still has its floor.
        assert!(a.reserve(0, 10).is_ok());
    }

    #[test]
    fn concurrent_floods_never_exceed_the_capacity_or_a_floor() {
        let a = Arc::new(admission(64, 2));
        let threads: Vec<_> = (0..2)
            .map(|m| {
                let a = a.clone();
                std::thread::spawn(move || (0..1000).filter(|_| a.reserve(m, 1).is_ok()).count())
            })
            .collect();
        let got: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(got.iter().sum::<usize>(), 64);
        assert!(got.iter().all(|&g| g >= a.floor(0)), "{got:?}");
    }
}
