//! The one queue every engine pulls from: jobs in arrival order behind a mutex, with a condvar
//! that wakes idle engines. An engine takes only as many images as it has free batch slots, so
//! a large job is split between engines (and between iterations of one engine), oldest first.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::Job;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// No more jobs will come: engines finish what is queued, then stop.
    closed: bool,
}

#[derive(Default)]
pub(super) struct JobQueue {
    state: Mutex<State>,
    wake: Condvar,
}

/// What [`JobQueue::take`] found.
pub(super) enum Take {
    /// The oldest job, or its first images if it had more than the room asked for.
    Part(Job),
    Empty,
    /// Closed and empty: no work will ever come.
    Closed,
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the deque inconsistent (every change is a
        // single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a job; hands it back if the queue is closed.
    pub fn push(&self, job: Job) -> Result<(), Job> {
        let mut s = self.lock();
        if s.closed {
            return Err(job);
        }
        s.jobs.push_back(job);
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// No more pushes; engines drain what is queued and stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Closes the queue and returns whatever is still in it.
    pub fn close_and_take_all(&self) -> Vec<Job> {
        let mut s = self.lock();
        s.closed = true;
        let jobs = s.jobs.drain(..).collect();
        drop(s);
        self.wake.notify_all();
        jobs
    }

    /// Up to `room` (≥ 1) images of the oldest job. With `wait`, blocks while the queue is empty
    /// and open.
    pub fn take(&self, room: usize, wait: bool) -> Take {
        let mut s = self.lock();
        loop {
            if let Some(head) = s.jobs.front_mut() {
                let part = if head.specs.len() > room.max(1) {
                    head.split_front(room.max(1))
                } else {
                    s.jobs.pop_front().expect("front exists")
                };
                let more = !s.jobs.is_empty();
                drop(s);
                if more {
                    // Another idle engine may take the rest.
                    self.wake.notify_one();
                }
                return Take::Part(part);
            }
            if s.closed {
                return Take::Closed;
            }
            if !wait {
                return Take::Empty;
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Removes (and returns) the queued jobs for which `remove` is true.
    pub fn remove_where(&self, mut remove: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut s = self.lock();
        if !s.jobs.iter().any(&mut remove) {
            return Vec::new();
        }
        let (gone, kept): (VecDeque<Job>, VecDeque<Job>) = s.jobs.drain(..).partition(remove);
        s.jobs = kept;
        gone.into()
    }

    #[cfg(test)]
    pub fn len_jobs(&self) -> usize {
        self.lock().jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{Guidance, GuidanceSchedule, SamplerKind};
    use crate::pipeline::ImageSpec;
    use std::time::{Duration, Instant};

    fn job(n: usize) -> Job {
        let spec = ImageSpec {
            label: 0,
            seed: 0,
            steps: 2,
            sampler: SamplerKind::Ddpm,
            guidance: Guidance::new(1.0, GuidanceSchedule::Constant).unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        Job::new("j".into(), vec![spec; n], deadline, false).0
    }

    #[test]
    fn large_jobs_are_split_oldest_first() {
        let q = JobQueue::default();
        assert!(q.push(job(5)).is_ok());
        assert!(q.push(job(2)).is_ok());
        let Take::Part(a) = q.take(3, false) else {
            panic!("a part")
        };
        assert_eq!((a.first_index, a.specs.len()), (0, 3));
        let Take::Part(b) = q.take(3, false) else {
            panic!("a part")
        };
        assert_eq!(
            (b.first_index, b.specs.len()),
            (3, 2),
            "the rest of the first job"
        );
        assert!(std::sync::Arc::ptr_eq(&a.shared, &b.shared));
        let Take::Part(c) = q.take(8, false) else {
            panic!("a part")
        };
        assert_eq!((c.first_index, c.specs.len()), (0, 2));
        assert!(matches!(q.take(1, false), Take::Empty));
        q.close();
        assert!(matches!(q.take(1, true), Take::Closed));
        assert!(q.push(job(1)).is_err(), "closed");
    }

    #[test]
    fn a_waiting_engine_wakes_on_push_and_on_close() {
        let q = std::sync::Arc::new(JobQueue::default());
        let q2 = q.clone();
        let waiter = std::thread::spawn(move || {
            let first = matches!(q2.take(4, true), Take::Part(_));
            let second = matches!(q2.take(4, true), Take::Closed);
            (first, second)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(q.push(job(1)).is_ok());
        std::thread::sleep(Duration::from_millis(50));
        q.close();
        assert_eq!(waiter.join().unwrap(), (true, true));
    }

    #[test]
    fn remove_where_keeps_order() {
        let q = JobQueue::default();
        for n in 1..=4 {
            assert!(q.push(job(n)).is_ok());
        }
        let gone = q.remove_where(|j| j.specs.len() % 2 == 0);
        assert_eq!(gone.len(), 2);
        assert_eq!(q.len_jobs(), 2);
        let Take::Part(a) = q.take(10, false) else {
            panic!("a part")
        };
        assert_eq!(a.specs.len(), 1);
    }
}
