//! The status file, rewritten every beat: written to `<path>.tmp`, then
//! renamed over `<path>`, so a reader (the benchmark, through the
//! container's rootfs) sees a whole file or the previous one.
//!
//! ```json
//! {"seq":1234,"now_ms":1767225600123,"started_ms":1767225590000,
//!  "ready_ms":1767225591500,"fill_ms":1500,"pages":131072,"page_size":4096,
//!  "seed":1,"dirty_bytes_per_sec":16777216,"beat_ms":10,
//!  "gap_since_ms":1767225591500,"max_gap_ms":1375.412,"max_gap_end_ms":1767225599000,
//!  "dirtied_pages":40960,"spot_checks":4936,"spot_bad":0,
//!  "verify":{"n":1,"ok":true,"bad_pages":0,"first_bad_page":null,
//!            "pages":131072,"ms":812,"at_ms":1767225600100}}
//! ```
//!
//! Times are CLOCK_REALTIME in ms (both "hosts" of a benchmark share one
//! clock). `max_gap_ms` is the longest interval between two consecutive
//! beats since `gap_since_ms` (the end of the fill, or the last SIGUSR2),
//! as the program saw it: across a migration, the application's downtime;
//! `max_gap_end_ms` is when that gap ended. Its own verification runs are
//! not counted as gaps. `verify` is null until the first SIGUSR1.

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in ms, with sub-ms precision.
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub seq: u64,
    pub now_ms: f64,
    pub started_ms: f64,
    pub ready_ms: f64,
    /// Since when `max_gap_ms` is measured: the end of the fill, or the
    /// last SIGUSR2.
    pub gap_since_ms: f64,
    pub pages: u64,
    pub seed: u64,
    pub dirty_bytes_per_sec: u64,
    pub beat_ms: u64,
    pub max_gap_ms: f64,
    pub max_gap_end_ms: f64,
    pub dirtied_pages: u64,
    pub spot_checks: u64,
    pub spot_bad: u64,
    pub verify: Option<VerifyRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyRecord {
    /// How many verifications have run (1 for the first).
    pub n: u64,
    pub bad_pages: u64,
    pub first_bad_page: Option<u64>,
    pub pages: u64,
    pub ms: f64,
    pub at_ms: f64,
}

impl VerifyRecord {
    pub fn ok(&self) -> bool {
        self.bad_pages == 0
    }

    /// The line printed to stdout.
    pub fn line(&self) -> String {
        format!(
            "migrate-heap: verify {}: {} of {} pages bad{}, {:.0} ms",
            if self.ok() { "ok" } else { "FAILED" },
            self.bad_pages,
            self.pages,
            self.first_bad_page
                .map_or(String::new(), |p| format!(" (first: page {p})")),
            self.ms
        )
    }
}

impl Status {
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(512);
        let _ = write!(
            s,
            "{{\"seq\":{},\"now_ms\":{},\"started_ms\":{},\"ready_ms\":{},\"fill_ms\":{},\
             \"pages\":{},\"page_size\":{},\"seed\":{},\"dirty_bytes_per_sec\":{},\"beat_ms\":{},\
             \"gap_since_ms\":{},\"max_gap_ms\":{:.3},\"max_gap_end_ms\":{},\"dirtied_pages\":{},\
             \"spot_checks\":{},\"spot_bad\":{},\"verify\":",
            self.seq,
            self.now_ms as u64,
            self.started_ms as u64,
            self.ready_ms as u64,
            (self.ready_ms - self.started_ms).max(0.0) as u64,
            self.pages,
            crate::content::PAGE,
            self.seed,
            self.dirty_bytes_per_sec,
            self.beat_ms,
            self.gap_since_ms as u64,
            self.max_gap_ms,
            self.max_gap_end_ms as u64,
            self.dirtied_pages,
            self.spot_checks,
            self.spot_bad,
        );
        match &self.verify {
            None => s.push_str("null"),
            Some(v) => {
                let _ = write!(
                    s,
                    "{{\"n\":{},\"ok\":{},\"bad_pages\":{},\"first_bad_page\":{},\
                     \"pages\":{},\"ms\":{:.0},\"at_ms\":{}}}",
                    v.n,
                    v.ok(),
                    v.bad_pages,
                    v.first_bad_page
                        .map_or_else(|| "null".to_owned(), |p| p.to_string()),
                    v.pages,
                    v.ms,
                    v.at_ms as u64
                );
            }
        }
        s.push_str("}\n");
        s
    }

    /// Replaces the file at `path` with this status, atomically.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_json())?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_field() {
        let mut st = Status {
            seq: 3,
            now_ms: 1_000_500.7,
            started_ms: 1_000_000.0,
            ready_ms: 1_000_250.0,
            gap_since_ms: 1_000_300.0,
            pages: 16,
            seed: 1,
            dirty_bytes_per_sec: 4096,
            beat_ms: 10,
            max_gap_ms: 12.3456,
            max_gap_end_ms: 1_000_400.0,
            dirtied_pages: 2,
            spot_checks: 12,
            spot_bad: 0,
            verify: None,
        };
        let v: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["now_ms"], 1_000_500);
        assert_eq!(v["fill_ms"], 250);
        assert_eq!(v["page_size"], 4096);
        assert_eq!(v["gap_since_ms"], 1_000_300);
        assert_eq!(v["max_gap_ms"], 12.346);
        assert_eq!(v["max_gap_end_ms"], 1_000_400);
        assert_eq!(v["dirtied_pages"], 2);
        assert!(v["verify"].is_null());

        st.verify = Some(VerifyRecord {
            n: 2,
            bad_pages: 1,
            first_bad_page: Some(9),
            pages: 16,
            ms: 3.4,
            at_ms: 1_000_450.0,
        });
        let v: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
        assert_eq!(
            v["verify"],
            serde_json::json!({"n": 2, "ok": false, "bad_pages": 1, "first_bad_page": 9,
                               "pages": 16, "ms": 3, "at_ms": 1_000_450})
        );
        let good = VerifyRecord {
            bad_pages: 0,
            first_bad_page: None,
            ..st.verify.unwrap()
        };
        assert_eq!(
            good.line(),
            "migrate-heap: verify ok: 0 of 16 pages bad, 3 ms"
        );
    }

    #[test]
    fn write_replaces_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let mut st = Status::default();
        st.write(&path).unwrap();
        st.seq = 7;
        st.write(&path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["seq"], 7);
        assert!(!dir.path().join("status.json.tmp").exists());
    }
}
