//! Locks that outlive a panic.
//!
//! hipvisor's mutexes guard tables whose every update is a single assignment or push, so a
//! panic while one is held (a bug, caught by the executor's supervision) cannot leave the
//! data half-written: the next holder may use it. [`lock`] says that once instead of at
//! every call site.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data over from a holder that panicked.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
