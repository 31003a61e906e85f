//! What the fuzz targets (`fuzz_control/`, `fuzz_archive/`) share: a counting allocator,
//! a time budget for proptest, byte-level mutations, and the seed corpus kept in the
//! repository under `common/fuzz/corpus/` (see `common/fuzz/README.md`).

#![allow(dead_code, clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};

// --- Memory ----------------------------------------------------------------------------

/// Counts, per thread, the bytes allocated through Rust's allocator and not yet freed, and
/// their peak. (C code such as zstd's allocates with malloc directly: not counted.)
struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: the allocator runs while thread locals are torn down, too.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counters are thread-local
// cells, which allocate nothing.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns what it returned and the most it held allocated at once, on this
/// thread, beyond what was live before.
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.with(Cell::get);
    let outer = PEAK.with(|peak| peak.replace(before));
    let value = f();
    let peak = PEAK.with(Cell::get);
    PEAK.with(|p| p.set(outer.max(peak)));
    (value, (peak - before).max(0) as usize)
}

// --- Running for a while ---------------------------------------------------------------

/// Seconds each target runs: `MIGRATE_FUZZ_SECS`, or a few so that `cargo test` stays quick.
pub fn fuzz_secs() -> f64 {
    std::env::var("MIGRATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0)
}

/// Cases per proptest run; runs follow one another until the time is up.
const BATCH: u32 = 64;

/// Where proptest keeps the seeds of a target's failures, replayed before any new case:
/// `common/fuzz/regressions/<target>.proptest-regressions`, kept in the repository.
pub fn regressions(target: &str) -> &'static str {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(format!("{target}.proptest-regressions"));
    Box::leak(path.to_string_lossy().into_owned().into_boxed_str())
}

/// Runs `test` on values of `strategy` for [`fuzz_secs`], in batches of proptest runs that
/// each replay the target's persisted failures ([`regressions`]; proptest appends the seed
/// of any new one) before trying new cases. A failure is shrunk, then fails the test with
/// the smallest input proptest found.
pub fn fuzz<S>(target: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let regressions = regressions(target);
    let secs = fuzz_secs();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let base = Config::default();
    let mut cases = 0u64;
    let mut batch = 0u64;
    loop {
        let config = Config {
            cases: BATCH,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
            // A minute of shrinking at most: the input found first is kept anyway.
            max_shrink_time: 60_000,
            // A fixed seed (PROPTEST_RNG_SEED) replays the whole run, batch after batch.
            rng_seed: match base.rng_seed {
                RngSeed::Fixed(seed) => RngSeed::Fixed(seed.wrapping_add(batch)),
                RngSeed::Random => RngSeed::Random,
            },
            ..base.clone()
        };
        let mut runner = TestRunner::new(config);
        match runner.run(&strategy, &test) {
            Ok(()) => {}
            Err(TestError::Fail(why, value)) => {
                panic!("fuzz {target}: {why}\nminimal failing input: {value:#?}")
            }
            Err(TestError::Abort(why)) => panic!("fuzz {target}: aborted: {why}"),
        }
        cases += u64::from(BATCH);
        batch += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("fuzz {target}: {cases} cases in {secs} s");
}

/// Fails the case with `what` unless `ok`.
macro_rules! ensure {
    ($ok:expr, $($what:tt)+) => {
        if !$ok {
            return Err(proptest::test_runner::TestCaseError::fail(format!($($what)+)));
        }
    };
}

// --- Inputs ----------------------------------------------------------------------------

/// Bytes that print as their length, hash and first bytes, not as a list a megabyte long
/// (proptest prints failing inputs and keeps them as comments in the regressions file).
#[derive(Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.0.iter().take(48).map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "{} bytes, blake3 {}, starting {head}",
            self.0.len(),
            &blake3::hash(&self.0).to_hex()[..16]
        )
    }
}

/// Keeps a failing input where a developer can pick it up for the corpus, and says where.
pub fn keep_failure(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{target}-{}.bin",
        &blake3::hash(input).to_hex()[..16]
    ));
    fs::write(&path, input).unwrap();
    path
}

/// Bytes that matter to parsers: zero, ends of ranges, tar's octal digits and separators.
const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'0', b'7', b'8', b' ', b'\n', b'/', b'.', b'=',
];

/// A byte-level change to an input, placed by [`Index`]es so that it shrinks and applies
/// to inputs of any length.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    SetRandom(Index, Vec<u8>),
    Insert(Index, Vec<u8>),
    Delete(Index, u16),
    /// Copies a run of the input elsewhere in it.
    Duplicate(Index, u16, Index),
    /// Cuts the input and goes on with the tail of another seed.
    Splice(Index, Index, Index),
    Truncate(Index),
    /// A protobuf varint as long as they go, claiming the largest lengths and values.
    HugeVarint(Index),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<Index>(), proptest::sample::select(INTERESTING))
            .prop_map(|(at, byte)| Mutation::SetByte(at, byte)),
        (
            any::<Index>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::SetRandom(at, bytes)),
        (
            any::<Index>(),
            proptest::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<Index>(), 1u16..1024).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<Index>(), 1u16..4096, any::<Index>())
            .prop_map(|(at, n, to)| Mutation::Duplicate(at, n, to)),
        (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(at, other, from)| Mutation::Splice(at, other, from)),
        any::<Index>().prop_map(Mutation::Truncate),
        any::<Index>().prop_map(Mutation::HugeVarint),
    ]
}

/// Largest input a mutation makes: past every bound on one header or frame that matters
/// here, small enough for thousands of cases a minute.
pub const MAX_INPUT: usize = 2 << 20;

impl Mutation {
    /// Applies the change to `input`; `seeds` are what a splice takes its tail from.
    pub fn apply(&self, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
        let len = input.len();
        match self {
            Mutation::FlipBit(at, bit) if len > 0 => input[at.index(len)] ^= 1 << bit,
            Mutation::SetByte(at, byte) if len > 0 => input[at.index(len)] = *byte,
            Mutation::SetRandom(at, bytes) if len > 0 => {
                let at = at.index(len);
                let n = bytes.len().min(len - at);
                input[at..at + n].copy_from_slice(&bytes[..n]);
            }
            Mutation::Insert(at, bytes) => {
                let at = at.index(len + 1);
                input.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete(at, n) if len > 0 => {
                let at = at.index(len);
                let n = usize::from(*n).min(len - at);
                input.drain(at..at + n);
            }
            Mutation::Duplicate(at, n, to) if len > 0 => {
                let at = at.index(len);
                let n = usize::from(*n).min(len - at);
                let run = input[at..at + n].to_vec();
                let to = to.index(len + 1);
                input.splice(to..to, run);
            }
            Mutation::Splice(at, other, from) if !seeds.is_empty() => {
                let other = other.get(seeds);
                input.truncate(at.index(len + 1));
                if !other.is_empty() {
                    input.extend_from_slice(&other[from.index(other.len())..]);
                }
            }
            Mutation::Truncate(at) => input.truncate(at.index(len + 1)),
            Mutation::HugeVarint(at) => {
                let at = at.index(len + 1);
                input.splice(
                    at..at,
                    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                );
            }
            _ => {}
        }
        input.truncate(MAX_INPUT);
    }
}

// --- The corpus ------------------------------------------------------------------------

/// `common/fuzz/corpus/<kind>`.
pub fn corpus_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(kind)
}

/// Every file of `common/fuzz/corpus/<kind>`, by name.
pub fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(kind);
    let mut seeds: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Writes the generated seeds of one kind over those in the corpus; the other files there
/// (inputs kept from failures, `regression-*`) stay.
pub fn write_corpus(kind: &str, seeds: &[(String, Vec<u8>)]) {
    let dir = corpus_dir(kind);
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes).unwrap();
    }
}
