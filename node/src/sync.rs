//! Locking helpers.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also when a thread panicked while holding it: every mutex of the node guards
/// state that stays consistent between statements (maps, counters, caches), so a panic
/// elsewhere must not turn into a panic here too.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
