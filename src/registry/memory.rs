//! Model memory: the budget (`--model-memory-budget`), how a version's footprint is measured,
//! and which resident models to evict to make room for another (least recently used first).
//!
//! The eviction choice is a pure function over a snapshot of the resident models
//! ([`plan_evictions`]), so that its rules are tested without loading anything: pinned models
//! and models with queued or in-flight work are never chosen, the least recently used idle ones
//! go first, and a model larger than the whole budget is refused instead of evicting everything.

use std::collections::BTreeMap;
use std::fmt;

/// How many bytes of model footprint each device may hold. A plain size applies to every
/// device; `cpu=8GiB,cuda:0=60GiB` sets one per device (devices not named have no limit
/// unless a plain size is given too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryBudget {
    every_device: Option<u64>,
    per_device: BTreeMap<String, u64>,
}

impl MemoryBudget {
    /// The limit for `device` (`cpu`, `cuda:0`), if any.
    pub fn limit(&self, device: &str) -> Option<u64> {
        self.per_device.get(device).copied().or(self.every_device)
    }

    /// No limit anywhere.
    pub fn is_unlimited(&self) -> bool {
        self.every_device.is_none() && self.per_device.is_empty()
    }

    /// The devices named in the budget, with their limits (for the budget gauge).
    pub fn named(&self) -> impl Iterator<Item = (&str, u64)> {
        self.per_device.iter().map(|(d, b)| (d.as_str(), *b))
    }
}

impl std::str::FromStr for MemoryBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut budget = MemoryBudget::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((device, size)) => {
                    let device = device.trim();
                    let valid = device == "cpu"
                        || device
                            .strip_prefix("cuda:")
                            .is_some_and(|n| n.parse::<usize>().is_ok());
                    if !valid {
                        return Err(format!(
                            "unknown device '{device}' in the memory budget (expected cpu or cuda:N)"
                        ));
                    }
                    budget
                        .per_device
                        .insert(device.to_string(), parse_size(size)?);
                }
                None => budget.every_device = Some(parse_size(part)?),
            }
        }
        if budget.is_unlimited() {
            return Err(
                "empty memory budget: give a size such as 8GiB or cpu=8GiB,cuda:0=60GiB".into(),
            );
        }
        Ok(budget)
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.every_device.iter().map(|b| mib(*b)).collect();
        parts.extend(
            self.per_device
                .iter()
                .map(|(d, b)| format!("{d}={}", mib(*b))),
        );
        f.write_str(&parts.join(","))
    }
}

pub use crate::config::size::parse_size;

/// Bytes as MiB with one decimal, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1 << 20) as f64)
}

/// A resident model as the eviction policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub name: String,
    /// Footprint on the device in question (all its versions).
    pub bytes: u64,
    /// When a request last used it (any monotonic clock: only the order matters).
    pub last_used: u64,
    /// `pinned = true` in its model.toml.
    pub pinned: bool,
    /// Queued or in-flight requests, or a load, unload or reload under way.
    pub busy: bool,
}

/// Why there is no room for a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// Larger than the device's whole budget: no eviction would make room.
    #[error("it needs {} on {device}, more than the whole model memory budget of {}", mib(*.need), mib(*.budget))]
    TooLarge {
        device: String,
        need: u64,
        budget: u64,
    },
    /// Room is held by pinned or busy models (or, without eviction, by any loaded model).
    #[error("the model memory budget on {device} is full: it needs {}, {} of {} is free and {} more is held by {}", mib(*.need), mib(.budget.saturating_sub(*.used)), mib(*.budget), mib(*.held), .holders)]
    Full {
        device: String,
        need: u64,
        used: u64,
        budget: u64,
        /// Bytes that could not be evicted, and by whom.
        held: u64,
        holders: String,
    },
}

impl NoRoom {
    /// Whether waiting could help (a busy model may become idle), unlike a model too large.
    pub fn is_transient(&self) -> bool {
        matches!(self, NoRoom::Full { .. })
    }
}

/// Which of `resident` to evict so that `need` more bytes fit in `budget` on `device`, where
/// `used` bytes are accounted now (the residents' and any others'). Least recently used idle,
/// unpinned models go first; with `evict` false nothing is evicted and a load that does not fit
/// is refused.
pub fn plan_evictions(
    device: &str,
    budget: u64,
    used: u64,
    need: u64,
    resident: &[Resident],
    evict: bool,
) -> Result<Vec<String>, NoRoom> {
    if need > budget {
        return Err(NoRoom::TooLarge {
            device: device.to_string(),
            need,
            budget,
        });
    }
    let mut free = budget.saturating_sub(used);
    if need <= free {
        return Ok(Vec::new());
    }
    let mut candidates: Vec<&Resident> = resident
        .iter()
        .filter(|r| evict && !r.pinned && !r.busy && r.bytes > 0)
        .collect();
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.name.cmp(&b.name)));
    let mut chosen = Vec::new();
    for c in candidates {
        if need <= free {
            break;
        }
        free += c.bytes;
        chosen.push(c.name.clone());
    }
    if need <= free {
        return Ok(chosen);
    }
    let kept: Vec<&Resident> = resident
        .iter()
        .filter(|r| !chosen.contains(&r.name))
        .collect();
    let held = kept.iter().map(|r| r.bytes).sum();
    let mut holders: Vec<String> = kept
        .iter()
        .map(|r| {
            let why = match (evict, r.pinned, r.busy) {
                (false, ..) => "loaded",
                (_, true, _) => "pinned",
                (_, _, true) => "busy",
                _ => "idle",
            };
            format!("'{}' ({why}, {})", r.name, mib(r.bytes))
        })
        .collect();
    if holders.len() > 8 {
        let more = holders.len() - 8;
        holders.truncate(8);
        holders.push(format!("{more} more"));
    }
    Err(NoRoom::Full {
        device: device.to_string(),
        need,
        used,
        budget,
        held,
        holders: if holders.is_empty() {
            "models being loaded".into()
        } else {
            holders.join(", ")
        },
    })
}

/// Heap bytes the process's allocator has handed out and not yet taken back: the CPU footprint
/// probe. Unlike resident memory it does not count freed pages the allocator keeps for reuse,
/// nor the arenas' high-water marks, so its growth over a load is what the model holds, not
/// what the allocator happened to keep (resident-memory deltas of one CNN measured 9 to 107 MiB
/// under traffic; this measures its weights). glibc's `mallinfo2`; resident memory elsewhere.
pub fn heap_in_use_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads glibc's own arena statistics; it has no preconditions.
        let m = unsafe { libc::mallinfo2() };
        Some((m.uordblks + m.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    process_rss_bytes()
}

/// The process's resident memory in bytes (Linux: /proc/self/statm).
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn r(name: &str, mib: u64, last_used: u64) -> Resident {
        Resident {
            name: name.into(),
            bytes: mib * MIB,
            last_used,
            pinned: false,
            busy: false,
        }
    }

    #[test]
    fn sizes_and_budgets_parse() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("300MiB").unwrap(), 300 << 20);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size(" 64 MiB ").unwrap(), 64 << 20);
        for bad in ["", "GiB", "-1GiB", "0", "8 parsecs", "1e9", "NaN"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }

        let plain: MemoryBudget = "8GiB".parse().unwrap();
        assert_eq!(plain.limit("cpu"), Some(8 << 30));
        assert_eq!(plain.limit("cuda:1"), Some(8 << 30));
        let split: MemoryBudget = "cpu=8GiB, cuda:0=60GiB".parse().unwrap();
        assert_eq!(split.limit("cpu"), Some(8 << 30));
        assert_eq!(split.limit("cuda:0"), Some(60 << 30));
        assert_eq!(split.limit("cuda:1"), None);
        let both: MemoryBudget = "1GiB,cuda:0=60GiB".parse().unwrap();
        assert_eq!(both.limit("cuda:1"), Some(1 << 30));
        assert_eq!(both.to_string(), "1024.0MiB,cuda:0=61440.0MiB");
        for bad in ["", ",", "tpu=1GiB", "cuda:x=1GiB", "cpu=lots"] {
            assert!(bad.parse::<MemoryBudget>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn nothing_is_evicted_while_the_model_fits() {
        let resident = [r("a", 100, 1), r("b", 100, 2)];
        let plan = plan_evictions("cpu", 1000 * MIB, 200 * MIB, 300 * MIB, &resident, true);
        assert_eq!(plan, Ok(vec![]));
    }

    #[test]
    fn least_recently_used_go_first_and_only_as_many_as_needed() {
        let resident = [r("new", 100, 30), r("old", 100, 10), r("mid", 100, 20)];
        // 300 of 350 used; 150 needed: freeing 'old' gives 150
        let plan = plan_evictions("cpu", 350 * MIB, 300 * MIB, 150 * MIB, &resident, true);
        assert_eq!(plan, Ok(vec!["old".to_string()]));
        let plan = plan_evictions("cpu", 350 * MIB, 300 * MIB, 250 * MIB, &resident, true);
        assert_eq!(plan, Ok(vec!["old".to_string(), "mid".to_string()]));
    }

    #[test]
    fn pinned_and_busy_models_are_never_evicted() {
        let mut pinned = r("pinned", 100, 1);
        pinned.pinned = true;
        let mut busy = r("busy", 100, 2);
        busy.busy = true;
        let resident = [pinned, busy, r("idle", 100, 3)];
        let plan = plan_evictions("cpu", 300 * MIB, 300 * MIB, 100 * MIB, &resident, true);
        assert_eq!(plan, Ok(vec!["idle".to_string()]));
        let err =
            plan_evictions("cpu", 300 * MIB, 300 * MIB, 200 * MIB, &resident, true).unwrap_err();
        assert!(err.is_transient());
        let msg = err.to_string();
        assert!(msg.contains("'pinned' (pinned"), "{msg}");
        assert!(msg.contains("'busy' (busy"), "{msg}");
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_without_evicting() {
        let resident = [r("a", 100, 1)];
        let err =
            plan_evictions("cuda:0", 300 * MIB, 100 * MIB, 301 * MIB, &resident, true).unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            "it needs 301.0MiB on cuda:0, more than the whole model memory budget of 300.0MiB"
        );
    }

    #[test]
    fn without_eviction_a_load_that_does_not_fit_is_refused() {
        let resident = [r("a", 100, 1)];
        let err =
            plan_evictions("cpu", 150 * MIB, 100 * MIB, 100 * MIB, &resident, false).unwrap_err();
        assert!(err.to_string().contains("'a' (loaded"), "{err}");
    }

    #[test]
    fn the_process_resident_memory_is_read() {
        let rss = process_rss_bytes().expect("statm readable on Linux");
        assert!(rss > MIB, "{rss}");
    }

    #[test]
    fn heap_in_use_follows_an_allocation_and_its_release() {
        // the figure is the whole process's: tests running beside this one allocate and free
        // too, so an attempt they disturb is tried again (one undisturbed attempt suffices)
        let mut seen = Vec::new();
        for _ in 0..20 {
            let before = heap_in_use_bytes().unwrap();
            let block = vec![1u8; 64 << 20];
            let during = heap_in_use_bytes().unwrap();
            drop(std::hint::black_box(block));
            let after = heap_in_use_bytes().unwrap();
            if during >= before + (60 << 20) && after + (60 << 20) <= during {
                return;
            }
            seen.push((before, during, after));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("heap in use did not follow a 64 MiB block: {seen:?}");
    }
}
