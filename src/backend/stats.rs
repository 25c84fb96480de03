//! Counts of which path the library took where the choice is its own (CUDA graph captures and
//! replays, fused kernels, deferred norms), kept per thread, so that a test can assert that a
//! path ran while other tests run on other threads. Compiled in with the `testing` feature only
//! (the CUDA tests build with it); without it [`count`] does nothing.

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// decode steps captured into a CUDA graph
    GraphCaptures,
    /// decode steps replayed from a CUDA graph
    GraphReplays,
    /// decode steps run eagerly on a graph's device inputs (the first on new cache buffers)
    GraphEagerSteps,
    /// captured graphs rebuilt for programmatic launches
    GraphsRebuilt,
    /// graph instances updated in place by a later capture
    GraphsUpdated,
    /// launches of a replayed step's fused attention kernel
    StepAttention,
    /// RMSNorms deferred into the matmuls around them
    DeferredNorms,
}

#[cfg(feature = "testing")]
const COUNTERS: usize = 7;

#[cfg(feature = "testing")]
thread_local! {
    static COUNTS: std::cell::Cell<[usize; COUNTERS]> = const { std::cell::Cell::new([0; COUNTERS]) };
}

/// Adds one to `c` on this thread (with the `testing` feature).
#[inline]
pub fn count(c: Counter) {
    #[cfg(feature = "testing")]
    COUNTS.with(|n| {
        let mut v = n.get();
        v[c as usize] += 1;
        n.set(v);
    });
    let _ = c;
}

/// How often `c` was counted on this thread.
#[cfg(feature = "testing")]
pub fn read(c: Counter) -> usize {
    COUNTS.with(|n| n.get()[c as usize])
}
