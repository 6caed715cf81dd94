//! Giving memory back after a burst of connections.
//!
//! Each connection costs a few tens of KB of buffers. After thousands of them (a flood, a
//! slowloris) glibc's malloc keeps the freed memory in its arenas for reuse, so RSS stays at
//! its peak although nothing uses it. Once the burst is over, `malloc_trim` returns the free
//! pages to the kernel. Measured in tests/ops (slowloris step): see docs/operations-tests.md.

/// Connections that must have gone since the last peak before memory is trimmed.
const SURGE: usize = 128;

/// Called every few seconds with the open connection count; returns the new peak. Trims once
/// the count has fallen by at least [`SURGE`] from its peak.
pub async fn after_connection_surge(peak: usize, open: usize) -> usize {
    if peak >= open + SURGE {
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
        return open;
    }
    peak.max(open)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap structures under its locks.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released, "malloc_trim after a connection surge");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
