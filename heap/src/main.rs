//! `migrate-heap`: the workload of migrate's benchmarks and end-to-end
//! tests. It runs in a container, holds a heap whose every page it can
//! re-derive, rewrites it at a set rate, and reports through a status file
//! in its own rootfs how long it was stopped (the application-side downtime
//! of a migration) and, on SIGUSR1, whether every page is intact.
//!
//! Single-threaded, no file descriptors held open between beats: nothing
//! stands in the way of a CRIU checkpoint and restore.

mod args;
mod content;
mod memory;
mod status;
mod workload;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use args::{Options, Parsed};
use status::{now_ms, Status, VerifyRecord};
use workload::{Pacer, Workload};

/// Set by SIGUSR1: verify every page at the next beat.
static VERIFY: AtomicBool = AtomicBool::new(false);
/// Set by SIGUSR2: start measuring the longest gap afresh (a benchmark
/// sends it just before a migration).
static RESET_GAP: AtomicBool = AtomicBool::new(false);
/// Set by SIGTERM and SIGINT: write a last status and exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    let flag = match signal {
        libc::SIGUSR1 => &VERIFY,
        libc::SIGUSR2 => &RESET_GAP,
        _ => &STOP,
    };
    flag.store(true, Ordering::SeqCst);
}

/// Handlers for SIGUSR1, SIGUSR2, SIGTERM and SIGINT. As a container's pid 1 the
/// program gets only signals it handles, so SIGTERM needs one too.
fn install_signal_handlers() -> std::io::Result<()> {
    for signal in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only stores to atomics, which is
        // async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match args::parse(std::env::args().skip(1)) {
        Ok(Parsed::Help) => {
            print!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Parsed::Run(opts)) => match run(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("migrate-heap: error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("migrate-heap: {e}\n\n{}", args::USAGE);
            ExitCode::from(2)
        }
    }
}

/// One line to stdout; a closed stdout is not a reason to stop.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(opts: &Options) -> Result<(), String> {
    install_signal_handlers().map_err(|e| format!("installing signal handlers: {e}"))?;
    if let Some(dir) = opts.status.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let started_ms = now_ms();
    let mut heap = Workload::new(opts.seed, opts.size)
        .map_err(|e| format!("mapping a heap of {} bytes: {e}", opts.size))?;
    heap.fill();
    let ready_ms = now_ms();
    say(&format!(
        "migrate-heap: ready: {} pages ({} MiB) filled in {:.0} ms, seed {}, dirty {} B/s, status {}",
        heap.pages(),
        (heap.pages() * content::PAGE as u64) >> 20,
        ready_ms - started_ms,
        opts.seed,
        opts.dirty_per_sec,
        opts.status.display()
    ));

    let mut st = Status {
        started_ms,
        ready_ms,
        gap_since_ms: ready_ms,
        pages: heap.pages(),
        seed: opts.seed,
        dirty_bytes_per_sec: opts.dirty_per_sec,
        beat_ms: opts.beat_ms,
        ..Status::default()
    };
    let mut pacer = Pacer::new(opts.dirty_per_sec, opts.beat_ms);
    let mut last_beat = ready_ms;
    let mut status_failing = false;
    loop {
        let now = now_ms();
        let gap = now - last_beat;
        if RESET_GAP.swap(false, Ordering::SeqCst) {
            st.max_gap_ms = 0.0;
            st.max_gap_end_ms = now;
            st.gap_since_ms = now;
        } else if gap > st.max_gap_ms {
            st.max_gap_ms = gap;
            st.max_gap_end_ms = now;
        }
        last_beat = now;

        heap.dirty(pacer.pages_for(gap));
        heap.spot_check(opts.reads_per_beat);

        if VERIFY.swap(false, Ordering::SeqCst) {
            let start = now_ms();
            let v = heap.verify();
            let end = now_ms();
            let record = VerifyRecord {
                n: st.verify.map_or(1, |r| r.n + 1),
                bad_pages: v.bad_pages,
                first_bad_page: v.first_bad_page,
                pages: v.pages,
                ms: end - start,
                at_ms: end,
            };
            say(&record.line());
            st.verify = Some(record);
            // The program's own pause, not a gap.
            last_beat = end;
        }

        st.seq += 1;
        st.now_ms = now_ms();
        st.dirtied_pages = heap.dirtied_pages;
        st.spot_checks = heap.spot_checks;
        st.spot_bad = heap.spot_bad;
        match st.write(&opts.status) {
            Ok(()) => status_failing = false,
            Err(e) if !status_failing => {
                eprintln!(
                    "migrate-heap: writing {}: {e} (will retry every beat)",
                    opts.status.display()
                );
                status_failing = true;
            }
            Err(_) => {}
        }

        if STOP.load(Ordering::SeqCst) {
            say(&format!(
                "migrate-heap: stopping after {} beats, longest gap {:.1} ms",
                st.seq, st.max_gap_ms
            ));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(opts.beat_ms));
    }
}
