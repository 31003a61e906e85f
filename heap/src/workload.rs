//! The heap as the program uses it: filled once, rewritten page by page at a
//! set rate, read at random, and checked against what each page must hold.
//!
//! The only state besides the pages is one version number per page (4 bytes
//! per 4 KiB page, on the ordinary heap): page `i` must hold
//! `content::fill_page(seed, i, versions[i])`.

use std::io;

use crate::content::{self, Rng, PAGE};
use crate::memory::Region;

#[derive(Debug)]
pub struct Workload {
    seed: u64,
    region: Region,
    versions: Vec<u32>,
    /// Picks the pages to rewrite and to read.
    rng: Rng,
    pub dirtied_pages: u64,
    pub spot_checks: u64,
    pub spot_bad: u64,
}

/// The outcome of checking every page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    pub pages: u64,
    pub bad_pages: u64,
    pub first_bad_page: Option<u64>,
}

impl Workload {
    /// Maps a heap of `size` bytes (rounded up to whole pages); not filled.
    pub fn new(seed: u64, size: u64) -> io::Result<Self> {
        let pages = usize::try_from(size.div_ceil(PAGE as u64))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "heap too large"))?;
        Ok(Self {
            seed,
            region: Region::map(pages)?,
            versions: vec![0; pages],
            rng: Rng::new(seed ^ 0x6865_6170),
            dirtied_pages: 0,
            spot_checks: 0,
            spot_bad: 0,
        })
    }

    pub fn pages(&self) -> u64 {
        self.region.pages() as u64
    }

    /// Writes every page, zero pages included, so that all of them are
    /// resident (a page never written is not in a checkpoint at all).
    pub fn fill(&mut self) {
        for index in 0..self.region.pages() {
            content::fill_page(self.seed, index as u64, 0, self.region.page_mut(index));
        }
    }

    /// Rewrites `n` pages picked at random over the whole heap, each with
    /// its next version.
    pub fn dirty(&mut self, n: u64) {
        for _ in 0..n {
            let index = self.rng.below(self.pages()) as usize;
            let version = self.versions[index].wrapping_add(1);
            self.versions[index] = version;
            content::fill_page(
                self.seed,
                index as u64,
                version,
                self.region.page_mut(index),
            );
        }
        self.dirtied_pages += n;
    }

    /// Reads `n` random pages and checks them; returns how many were wrong.
    pub fn spot_check(&mut self, n: u64) -> u64 {
        let mut bad = 0;
        for _ in 0..n {
            let index = self.rng.below(self.pages()) as usize;
            if !self.page_ok(index) {
                bad += 1;
            }
        }
        self.spot_checks += n;
        self.spot_bad += bad;
        bad
    }

    /// Checks every page.
    pub fn verify(&self) -> Verification {
        let mut v = Verification {
            pages: self.pages(),
            bad_pages: 0,
            first_bad_page: None,
        };
        for index in 0..self.region.pages() {
            if !self.page_ok(index) {
                v.bad_pages += 1;
                v.first_bad_page.get_or_insert(index as u64);
            }
        }
        v
    }

    fn page_ok(&self, index: usize) -> bool {
        content::check_page(
            self.seed,
            index as u64,
            self.versions[index],
            self.region.page(index),
        )
    }

    #[cfg(test)]
    fn corrupt(&mut self, index: usize) {
        self.region.page_mut(index)[100] ^= 1;
    }
}

/// Turns a rate in bytes per second into whole pages per beat, carrying
/// the remainder. After a long pause (a migration) it does not try to catch
/// up: a burst of rewriting would itself stall the beat it happens in.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    /// Longest interval credited at once, in ms.
    max_interval_ms: f64,
    credit: f64,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64, beat_ms: u64) -> Self {
        Self {
            bytes_per_sec,
            max_interval_ms: 4.0 * beat_ms as f64,
            credit: 0.0,
        }
    }

    /// Pages to rewrite after `elapsed_ms` since the last call.
    pub fn pages_for(&mut self, elapsed_ms: f64) -> u64 {
        let ms = elapsed_ms.clamp(0.0, self.max_interval_ms);
        self.credit += self.bytes_per_sec as f64 * ms / 1000.0;
        let pages = (self.credit / PAGE as f64).floor();
        self.credit -= pages * PAGE as f64;
        pages as u64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_and_dirtied_heap_verifies() {
        let mut w = Workload::new(5, 64 * PAGE as u64 - 10).unwrap();
        assert_eq!(w.pages(), 64);
        w.fill();
        assert_eq!(w.verify().bad_pages, 0);
        w.dirty(200);
        assert_eq!(w.dirtied_pages, 200);
        assert!(w.versions.iter().filter(|&&v| v > 0).count() > 40);
        assert_eq!(w.spot_check(50), 0);
        let v = w.verify();
        assert_eq!(
            v,
            Verification {
                pages: 64,
                bad_pages: 0,
                first_bad_page: None
            }
        );
    }

    #[test]
    fn verify_finds_damaged_pages() {
        let mut w = Workload::new(5, 32 * PAGE as u64).unwrap();
        w.fill();
        w.corrupt(7);
        w.corrupt(20);
        let v = w.verify();
        assert_eq!(v.bad_pages, 2);
        assert_eq!(v.first_bad_page, Some(7));
        assert!(w.spot_check(400) > 0);
        assert!(w.spot_bad > 0);
    }

    #[test]
    fn an_unfilled_heap_fails_verification() {
        // Zero pages pass, every other page fails: what a restore that lost
        // the memory would look like.
        let w = Workload::new(5, 100 * PAGE as u64).unwrap();
        let v = w.verify();
        assert!(v.bad_pages > 50 && v.bad_pages < 100, "{v:?}");
    }

    #[test]
    fn pacer_keeps_the_rate_and_caps_bursts() {
        // 16 MiB/s at 10 ms beats: 4096 pages/s, 40.96 pages per beat.
        let mut p = Pacer::new(16 << 20, 10);
        let total: u64 = (0..100).map(|_| p.pages_for(10.0)).sum();
        assert!((4095..=4096).contains(&total), "{total}");
        // A 3 s gap is credited as 40 ms at most.
        let burst = p.pages_for(3000.0);
        assert!((163..=165).contains(&burst), "{burst}");
        assert_eq!(Pacer::new(0, 10).pages_for(10.0), 0);
        assert_eq!(p.pages_for(-5.0), 0);
    }
}
