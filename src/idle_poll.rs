//! Optional idle polling (`--idle-poll-us`): keeps the CPUs from going idle while requests are
//! in flight and for a short window after the last one, so that waking a thread does not pay
//! for waking a halted CPU.
//!
//! A request crosses several threads (the HTTP worker, the model's queue and engine threads,
//! back to the HTTP worker, then the client). Each hand-off wakes a thread, often on a CPU that
//! went idle meanwhile. On bare metal that costs a few microseconds; on a virtual machine whose
//! host does not poll for its guests (`haltpoll`'s `guest_halt_poll_ns` = 0, the case in many
//! clouds) a halted vCPU is woken through the hypervisor, tens of microseconds per hand-off.
//!
//! The pollers are one thread per CPU under `SCHED_IDLE`, Linux's lowest scheduling class, each
//! calling `sched_yield` in a loop: they run only when nothing else wants the CPU and give it up
//! at once when anything does, so they take CPU time only from the idle state, not from the
//! server or anything else running. Outside the window they sleep.
//!
//! The pollers keep the CPUs awake; the hand-offs between a model's own threads are cut out
//! altogether: with idle polling on, each model's queue and engine threads poll their channel
//! for the same window before they block ([`crate::batcher::BatchConfig::poll_window`]), so an
//! item handed to them is found without a kernel wake-up (measured at concurrency 1: the queue
//! hand-off ~85 µs → ~9 µs).
//!
//! The price is CPU time that is accounted as used (power, and CPU quotas: do not combine with
//! a CFS CPU limit, where polling would be throttled and spend the quota; use it with dedicated
//! cores). Seastar's `--idle-poll-time-us` and the kernel's `busy_poll` make the same trade.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// `--idle-poll-us` as the rest of the server sees it: off, or pollers running with their
/// window. Built once at start-up ([`IdlePolling::start`]); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct IdlePolling(Option<Arc<IdlePoll>>);

impl IdlePolling {
    /// Off: nothing polls, model threads block at once.
    pub fn off() -> Self {
        Self(None)
    }

    /// Starts one poller per CPU this process may use when `window` is not zero. Where the
    /// platform cannot run them at the lowest priority, logs why and stays off.
    pub fn start(window: Duration) -> Self {
        if window.is_zero() {
            return Self::off();
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let poll = IdlePoll::new(window);
        match poll.start(threads) {
            Ok(()) => {
                tracing::info!(
                    threads,
                    window_us = window.as_micros() as u64,
                    "idle polling on: CPUs kept from idling while requests are in flight (SCHED_IDLE pollers; model threads poll for work)"
                );
                Self(Some(poll))
            }
            Err(e) => {
                tracing::warn!(error = %e, "idle polling unavailable; running without it");
                Self::off()
            }
        }
    }

    /// How long each model's queue and engine threads poll their channel before blocking
    /// ([`crate::batcher::BatchConfig::poll_window`]): the window while the pollers run, else
    /// zero.
    pub fn window(&self) -> Duration {
        self.0.as_ref().map_or(Duration::ZERO, |p| p.window)
    }

    /// Marks a request in flight (nothing when off).
    pub fn busy(&self) -> Option<Busy> {
        self.0.as_ref().map(IdlePoll::busy)
    }

    /// Stops the pollers, if any.
    pub fn stop(&self) {
        if let Some(p) = &self.0 {
            p.stop();
        }
    }
}

/// The shared state: requests in flight, when the last one ended, and the pollers' bed.
#[derive(Debug)]
pub struct IdlePoll {
    window: Duration,
    epoch: Instant,
    busy: AtomicUsize,
    /// Nanoseconds from `epoch` to the end of the most recent request.
    last_end_ns: AtomicU64,
    asleep: AtomicBool,
    bed: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Marks the server busy while it lives (one per request in flight).
#[derive(Debug)]
pub struct Busy(Arc<IdlePoll>);

impl Drop for Busy {
    fn drop(&mut self) {
        let p = &self.0;
        p.last_end_ns.store(p.now_ns(), Ordering::Release);
        p.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl IdlePoll {
    /// Idle polling with `window` after the last request; no threads yet (see [`Self::start`]).
    pub fn new(window: Duration) -> Arc<Self> {
        Arc::new(Self {
            window,
            epoch: Instant::now(),
            busy: AtomicUsize::new(0),
            last_end_ns: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            bed: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        })
    }

    /// Starts `threads` pollers under `SCHED_IDLE`. Fails, starting none, where the platform
    /// has no such class: a poller at normal priority would take CPU from the real work.
    pub fn start(self: &Arc<Self>, threads: usize) -> std::io::Result<()> {
        // the class is per thread: check it can be had before spawning anything
        lowest_priority()?;
        for i in 0..threads {
            let me = self.clone();
            std::thread::Builder::new()
                .name(format!("idle-poll-{i}"))
                .spawn(move || {
                    if lowest_priority().is_ok() {
                        me.poll();
                    }
                })?;
        }
        Ok(())
    }

    /// The request now starting keeps the CPUs polling until it ends (and a window after).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            let _bed = self.bed.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        Busy(self.clone())
    }

    /// Whether pollers should spin now: requests in flight, or the last ended within the window.
    pub fn active(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
            || self
                .now_ns()
                .saturating_sub(self.last_end_ns.load(Ordering::Acquire))
                < self.window.as_nanos() as u64
    }

    /// Stops the pollers (they exit at their next check).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _bed = self.bed.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn poll(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.active() {
                // Enter the kernel on every turn rather than spin in user space: measured on a
                // 2-vCPU VM, a plain spin loop (even under SCHED_IDLE) left threads woken onto
                // its CPU waiting up to a scheduler tick (client max 13 ms), while yielding
                // hands the CPU over at once.
                std::thread::yield_now(); // sched_yield(2)
                continue;
            }
            // Idle beyond the window: sleep until a request starts. `asleep` is set before
            // `busy` is read again under the lock, and `busy()` adds to `busy` before reading
            // `asleep` and notifies under the lock, so a starting request is never missed.
            let mut bed = self.bed.lock().unwrap_or_else(|e| e.into_inner());
            self.asleep.store(true, Ordering::SeqCst);
            while self.busy.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
                bed = self.wake.wait(bed).unwrap_or_else(|e| e.into_inner());
            }
            self.asleep.store(false, Ordering::SeqCst);
        }
    }
}

/// Moves the calling thread to `SCHED_IDLE`.
#[cfg(target_os = "linux")]
fn lowest_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter struct.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn lowest_priority() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "idle polling needs Linux's SCHED_IDLE",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_while_busy_and_for_the_window_after() {
        let p = IdlePoll::new(Duration::from_millis(50));
        // nothing has happened yet, but the epoch is new: past the window, it is idle
        std::thread::sleep(Duration::from_millis(60));
        assert!(!p.active());
        let a = p.busy();
        let b = p.busy();
        assert!(p.active());
        drop(a);
        assert!(p.active(), "one request still in flight");
        drop(b);
        assert!(p.active(), "within the window after the last request");
        std::thread::sleep(Duration::from_millis(60));
        assert!(!p.active(), "window over");
    }

    #[test]
    fn sleeping_pollers_wake_for_a_request_and_stop() {
        let p = IdlePoll::new(Duration::ZERO);
        // run the poll loop on a normal thread (the class does not matter for the logic)
        let poller = {
            let p = p.clone();
            std::thread::spawn(move || p.poll())
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !p.asleep.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "poller never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        let busy = p.busy();
        while p.asleep.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "poller did not wake for a request"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(busy);
        p.stop();
        poller.join().expect("poller exits on stop");
    }
}
