//! Open connections must fit in the process's descriptor limit: past it `accept` fails with
//! EMFILE and nobody, `/healthz` included, gets in. The soft limit is raised towards the hard
//! one when `--max-connections` needs it, and the connection bound is lowered (with a warning)
//! if even the hard limit is too small.

/// Descriptors kept for everything that is not a client connection: the listener, model files,
/// the runtime's own, logs.
const RESERVED_FDS: u64 = 128;

/// The connection bound that fits the descriptor limit (raising the soft limit if needed).
pub fn fit_connections(wanted: usize) -> usize {
    match fit(wanted as u64 + RESERVED_FDS) {
        Some(limit) if limit < wanted as u64 + RESERVED_FDS => {
            let fits = limit.saturating_sub(RESERVED_FDS).max(1) as usize;
            tracing::warn!(
                wanted,
                fits,
                descriptor_limit = limit,
                "--max-connections does not fit the descriptor limit (ulimit -n); lowered"
            );
            fits
        }
        _ => wanted,
    }
}

/// Raises the soft descriptor limit to `needed` (at most the hard limit); the limit now.
#[cfg(unix)]
// rlim_t is u64 on Linux but not on every unix.
#[allow(clippy::unnecessary_cast)]
fn fit(needed: u64) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let cur = lim.rlim_cur as u64;
    if cur >= needed || lim.rlim_cur == libc::RLIM_INFINITY {
        return Some(cur);
    }
    let raised = libc::rlimit {
        rlim_cur: (needed.min(lim.rlim_max as u64)) as libc::rlim_t,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        Some(raised.rlim_cur as u64)
    } else {
        Some(cur)
    }
}

#[cfg(not(unix))]
fn fit(_needed: u64) -> Option<u64> {
    None
}
