//! The decode budget: bytes of decoded pixels (and of tokenisers' working memory) in flight
//! across the server, so that a burst of large payloads waits its turn instead of taking
//! memory all at once.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::CodecError;

/// How long an image waits for room in the decode budget before its request is refused (503).
pub const DECODE_WAIT: Duration = Duration::from_secs(10);

/// Bytes of decoded pixels in flight across the server: a decode takes its share before it
/// starts and gives it back when the image is pre-processed, so a burst of large images waits
/// (in arrival order) instead of taking memory all at once. An image larger than the whole
/// budget runs when it is alone.
#[derive(Debug)]
pub struct DecodeBudget {
    capacity: u64,
    state: Mutex<BudgetState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct BudgetState {
    used: u64,
    next_ticket: u64,
    waiting: VecDeque<u64>,
}

/// A share of the decode budget, given back on drop.
pub struct BudgetShare<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl Drop for BudgetShare<'_> {
    fn drop(&mut self) {
        let mut s = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.used -= self.bytes;
        self.budget.changed.notify_all();
    }
}

impl DecodeBudget {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes taken now.
    pub fn used(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).used
    }

    /// Takes `bytes` (at most the whole budget) once every earlier waiter has been served and
    /// they fit, waiting at most `wait`; `None` when the wait ran out.
    pub fn acquire(&self, bytes: u64, wait: Duration) -> Option<BudgetShare<'_>> {
        let bytes = bytes.min(self.capacity);
        let deadline = Instant::now() + wait;
        let ticket = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            if s.waiting.is_empty() && s.used + bytes <= self.capacity {
                s.used += bytes;
                return Some(BudgetShare {
                    budget: self,
                    bytes,
                });
            }
            s.waiting.push_back(ticket);
            ticket
        };
        // waiting blocks this thread: on a runtime worker, tell tokio first
        block_in_place_if_needed(|| self.wait_turn(ticket, bytes, deadline))
    }

    fn wait_turn(&self, ticket: u64, bytes: u64, deadline: Instant) -> Option<BudgetShare<'_>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if s.waiting.front() == Some(&ticket) && s.used + bytes <= self.capacity {
                s.waiting.pop_front();
                s.used += bytes;
                self.changed.notify_all();
                return Some(BudgetShare {
                    budget: self,
                    bytes,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                s.waiting.retain(|&t| t != ticket);
                self.changed.notify_all();
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A share of the server's decode budget (none configured: no share) for `bytes` of decoding,
/// waiting up to [`DECODE_WAIT`]; [`CodecError::Busy`] when the wait runs out. Images and
/// tokenising both take theirs here.
pub fn decode_share(
    budget: Option<&'static DecodeBudget>,
    bytes: u64,
) -> Result<Option<BudgetShare<'static>>, CodecError> {
    let Some(budget) = budget else {
        return Ok(None);
    };
    budget.acquire(bytes, DECODE_WAIT).map(Some).ok_or_else(|| {
        CodecError::Busy(format!(
            "the server is decoding its limit of {} MiB; retry later",
            budget.capacity() >> 20
        ))
    })
}

/// Runs `f`, which blocks, through `block_in_place` when on a multi-thread runtime's worker.
fn block_in_place_if_needed<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decode_budget_serves_in_order_waits_and_gives_up() {
        use std::sync::Arc;
        let budget: &'static DecodeBudget = Box::leak(Box::new(DecodeBudget::new(100)));
        let a = budget.acquire(60, Duration::ZERO).unwrap();
        // 60 + 60 > 100: the next waits, and gives up when its wait runs out
        let started = Instant::now();
        assert!(budget.acquire(60, Duration::from_millis(50)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(budget.used(), 60);
        // one larger than the whole budget runs alone, once the others are done
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = [(1, 500u64), (2, 30)]
            .into_iter()
            .map(|(id, bytes)| {
                let order = order.clone();
                let t = std::thread::spawn(move || {
                    let share = budget.acquire(bytes, Duration::from_secs(5)).unwrap();
                    order.lock().unwrap().push(id);
                    std::thread::sleep(Duration::from_millis(20));
                    drop(share);
                });
                std::thread::sleep(Duration::from_millis(30));
                t
            })
            .collect();
        // the 30-byte one would fit now, but waits behind the earlier, larger one
        std::thread::sleep(Duration::from_millis(50));
        assert!(order.lock().unwrap().is_empty());
        drop(a);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [1, 2], "arrival order");
        assert_eq!(budget.used(), 0, "every share given back");
    }
}
