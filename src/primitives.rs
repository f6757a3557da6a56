//! What every layer builds on and nothing in herald defines better elsewhere: poison-tolerant locks,
//! tight growth for the short lists an idle connection keeps, the process's one TLS crypto
//! provider, and giving the allocator's free memory back. Imports nothing of herald.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks a mutex, recovering from poisoning: the state behind herald's locks is kept consistent by
/// each critical section (no panics inside them), so a poisoned lock is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for reading an `RwLock`.
pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for writing an `RwLock`.
pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Makes room for one more item in `v`, exactly while it is short: a `Vec`'s first allocation holds
/// four items, and the per-connection lists (a user's sessions, a session's subscriptions) mostly
/// hold one or two, for every idle connection.
pub(crate) fn reserve_tight<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        if v.len() < 4 {
            v.reserve_exact(1);
        } else {
            v.reserve(1);
        }
    }
}

/// Installs rustls' `ring` crypto provider as the process default (idempotent). The push providers'
/// HTTP client and `rediss://` need one; a program that builds its own reqwest client next to herald
/// (the examples, the tests) calls this first (as `herald::install_crypto_provider`), since herald's
/// reqwest carries no provider of its own.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Returns the allocator's free memory to the system. glibc keeps what a burst freed in its arenas
/// (one per thread), so without this a node's RSS stays at its largest burst: after the harness's
/// 5,000-member join, 4.0-4.3 KB per idle connection, 3.7-3.85 KB with it. A call takes each arena's
/// lock in turn: 0.1-1.1 ms at 1M deliveries/s. (Other allocators: nothing is done.)
pub(crate) fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only releases free pages; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time the calling thread has used, ns (`CLOCK_THREAD_CPUTIME_ID`: the time it ran, not the
/// time that passed while it was preempted); 0 where it cannot be read.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: clock_gettime writes one `timespec` through a pointer to a live, aligned local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return 0;
    }
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// Asks the CPU to start loading the `lines` cache lines from `p` (a hint: nothing is read into the
/// program). A fan-out visits a thousand sessions whose state went cold since the last one, each
/// visit a few dependent loads and a `send()`; the next session's lines, asked for before this
/// one's `send()`, are there when it comes to it. A no-op off x86-64.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in 0..lines {
        #[allow(unsafe_code)]
        // SAFETY: a prefetch reads nothing the program sees and does not fault, whatever the
        // address (`wrapping_add` makes none dereferenceable either).
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i * 64).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}
