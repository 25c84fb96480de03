//! Peak memory of this process, as the `Peak memory: X GB` line reports it.

/// Peak resident set size of the process in bytes (0 where the platform does not say).
pub fn peak_memory_bytes() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and touches nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0;
    }
    let max = usage.ru_maxrss.max(0) as u64;
    // Linux reports kilobytes, macOS bytes.
    if cfg!(target_os = "macos") {
        max
    } else {
        max * 1024
    }
}

/// Peak memory in GB (10^9 bytes, as mlx reports it).
pub fn peak_memory_gb() -> f64 {
    peak_memory_bytes() as f64 / 1e9
}
