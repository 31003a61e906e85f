//! What each heap page holds: a pure function of (seed, page index, page
//! version), so the program can re-derive every page and check it.
//!
//! The mix imitates a real heap under compression: about 30 % zero pages
//! (allocated but cleared), 55 % text-like records (key=value lines,
//! JSON-ish objects, runs of words and numbers from a small vocabulary) and
//! 15 % random bytes (already compressed or encrypted data). With zstd
//! level 1, the level `migrate` streams with, the whole heap compresses
//! about 3.5x.

pub const PAGE: usize = 4096;

/// Percent of pages that are zero, text, random (in that order).
pub const ZERO_PERCENT: u64 = 30;
pub const TEXT_PERCENT: u64 = 55;
/// Percent of text records that repeat one of the last few: the knob that
/// sets how well text pages compress.
const REPEAT_PERCENT: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Zero,
    Text,
    Random,
}

/// wyrand: small, fast and good enough to make pages differ.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed))
    }

    /// The generator for one version of one page.
    fn for_page(seed: u64, index: u64, version: u32) -> Self {
        let key = splitmix(seed ^ splitmix(index ^ (u64::from(version) << 40)));
        Self(key)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias worth caring about.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The kind of a page version, drawn first from the page's generator.
#[cfg(test)]
pub fn kind_of(seed: u64, index: u64, version: u32) -> Kind {
    kind_from(&mut Rng::for_page(seed, index, version))
}

fn kind_from(rng: &mut Rng) -> Kind {
    match rng.below(100) {
        r if r < ZERO_PERCENT => Kind::Zero,
        r if r < ZERO_PERCENT + TEXT_PERCENT => Kind::Text,
        _ => Kind::Random,
    }
}

/// Writes the content of `version` of page `index` into `out`.
pub fn fill_page(seed: u64, index: u64, version: u32, out: &mut [u8; PAGE]) -> Kind {
    let mut rng = Rng::for_page(seed, index, version);
    let kind = kind_from(&mut rng);
    match kind {
        Kind::Zero => out.fill(0),
        Kind::Random => {
            for chunk in out.chunks_exact_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        Kind::Text => fill_text(&mut rng, out),
    }
    kind
}

/// Whether `page` holds exactly `version` of page `index`.
pub fn check_page(seed: u64, index: u64, version: u32, page: &[u8; PAGE]) -> bool {
    let mut rng = Rng::for_page(seed, index, version);
    match kind_from(&mut rng) {
        Kind::Zero => page.iter().all(|&b| b == 0),
        Kind::Random => page
            .chunks_exact(8)
            .all(|chunk| chunk == rng.next_u64().to_le_bytes()),
        Kind::Text => {
            let mut expected = [0u8; PAGE];
            fill_text(&mut rng, &mut expected);
            expected == *page
        }
    }
}

const WORDS: [&str; 64] = [
    "user",
    "session",
    "order",
    "item",
    "price",
    "amount",
    "status",
    "active",
    "pending",
    "failed",
    "request",
    "response",
    "region",
    "cache",
    "hit",
    "miss",
    "latency",
    "error",
    "warning",
    "info",
    "debug",
    "trace",
    "node",
    "cluster",
    "shard",
    "replica",
    "leader",
    "follower",
    "queue",
    "topic",
    "partition",
    "offset",
    "commit",
    "rollback",
    "token",
    "expires",
    "created",
    "updated",
    "deleted",
    "name",
    "email",
    "address",
    "city",
    "country",
    "product",
    "category",
    "stock",
    "warehouse",
    "invoice",
    "payment",
    "card",
    "refund",
    "cart",
    "checkout",
    "shipping",
    "delivered",
    "true",
    "false",
    "null",
    "count",
    "total",
    "average",
    "min",
    "max",
];

/// Text made of records, line after line, cut at the page's end.
fn fill_text(rng: &mut Rng, out: &mut [u8; PAGE]) {
    let mut w = Writer { out, pos: 0 };
    // Where the last few records start: heaps hold many copies of the same
    // strings, so some records repeat a recent one.
    let mut recent = [0usize; 8];
    let mut records = 0usize;
    while !w.full() {
        let start = w.pos;
        if records > 0 && rng.below(100) < REPEAT_PERCENT {
            let from = recent[rng.below(records.min(recent.len()) as u64) as usize];
            w.repeat(from);
        } else {
            match rng.below(4) {
                0 => key_value(rng, &mut w),
                1 => words(rng, &mut w),
                _ => json(rng, &mut w),
            }
        }
        recent[records % recent.len()] = start;
        records += 1;
    }
}

/// A word, the first ones of the vocabulary more often (as in real text).
fn word(rng: &mut Rng) -> &'static str {
    let n = WORDS.len() as u64;
    WORDS[rng.below(n).min(rng.below(n)).min(rng.below(n)) as usize]
}

/// A number of 1 to 6 digits, small ones more likely.
fn number(rng: &mut Rng) -> u64 {
    const LIMITS: [u64; 8] = [10, 10, 10, 100, 100, 100, 1000, 100_000];
    let limit = LIMITS[rng.below(LIMITS.len() as u64) as usize];
    rng.below(limit)
}

/// `order.status=pending` or `cache.hit=1234`
fn key_value(rng: &mut Rng, w: &mut Writer<'_>) {
    w.put(word(rng));
    w.put(".");
    w.put(word(rng));
    w.put("=");
    if rng.below(2) == 0 {
        w.put(word(rng));
    } else {
        w.num(number(rng));
    }
    w.put("\n");
}

/// `{"id":4711,"type":"email","status":"active","amount":12.34,"tags":["a","b"]}`
fn json(rng: &mut Rng, w: &mut Writer<'_>) {
    w.put("{\"id\":");
    w.num(number(rng));
    w.put(",\"type\":\"");
    w.put(word(rng));
    w.put("\",\"status\":\"");
    w.put(word(rng));
    w.put("\",\"amount\":");
    w.num(number(rng));
    w.put(".");
    w.num(rng.below(100));
    w.put(",\"tags\":[\"");
    w.put(word(rng));
    w.put("\",\"");
    w.put(word(rng));
    w.put("\"]}\n");
}

/// `info node shard 17 leader commit 3 offset`
fn words(rng: &mut Rng, w: &mut Writer<'_>) {
    let n = 4 + rng.below(8);
    for i in 0..n {
        if i > 0 {
            w.put(" ");
        }
        if rng.below(4) == 0 {
            w.num(number(rng));
        } else {
            w.put(word(rng));
        }
    }
    w.put("\n");
}

/// Appends to a page, dropping whatever does not fit.
struct Writer<'a> {
    out: &'a mut [u8; PAGE],
    pos: usize,
}

impl Writer<'_> {
    fn full(&self) -> bool {
        self.pos >= PAGE
    }

    fn bytes(&mut self, b: &[u8]) {
        let n = b.len().min(PAGE - self.pos);
        self.out[self.pos..self.pos + n].copy_from_slice(&b[..n]);
        self.pos += n;
    }

    /// Copies the line that starts at `from` (before the current position).
    fn repeat(&mut self, from: usize) {
        let len = self.out[from..self.pos]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.pos - from, |n| n + 1);
        let n = len.min(PAGE - self.pos);
        self.out.copy_within(from..from + n, self.pos);
        self.pos += n;
    }

    fn put(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&digits[i..]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn page(seed: u64, index: u64, version: u32) -> [u8; PAGE] {
        let mut p = [0u8; PAGE];
        fill_page(seed, index, version, &mut p);
        p
    }

    #[test]
    fn pages_are_a_function_of_seed_index_and_version() {
        for index in 0..200 {
            assert_eq!(page(7, index, 0), page(7, index, 0));
            assert_eq!(page(7, index, 3), page(7, index, 3));
        }
        // Non-zero pages differ from one another and across versions and
        // seeds (zero pages are all alike).
        let non_zero = |s, i, v| kind_of(s, i, v) != Kind::Zero;
        let mut compared = 0;
        for index in 0..200 {
            if non_zero(7, index, 0) && non_zero(7, index + 1, 0) {
                assert_ne!(page(7, index, 0), page(7, index + 1, 0));
                compared += 1;
            }
            if non_zero(7, index, 0) && non_zero(7, index, 1) {
                assert_ne!(page(7, index, 0), page(7, index, 1));
            }
            if non_zero(7, index, 0) && non_zero(8, index, 0) {
                assert_ne!(page(7, index, 0), page(8, index, 0));
            }
        }
        assert!(compared > 50);
    }

    #[test]
    fn check_accepts_the_right_version_only() {
        for index in 0..300 {
            let p = page(1, index, 2);
            assert!(check_page(1, index, 2, &p));
            if kind_of(1, index, 2) != Kind::Zero || kind_of(1, index, 3) != Kind::Zero {
                assert!(!check_page(1, index, 3, &p), "page {index}");
            }
            let mut flipped = p;
            flipped[index as usize * 13 % PAGE] ^= 0x40;
            assert!(!check_page(1, index, 2, &flipped), "page {index}");
        }
    }

    #[test]
    fn kinds_are_mixed_as_documented() {
        let n = 100_000u64;
        let mut counts = [0u64; 3];
        for index in 0..n {
            let k = kind_of(42, index, (index % 5) as u32);
            counts[k as usize] += 1;
        }
        let pct = |c: u64| c as f64 * 100.0 / n as f64;
        assert!((pct(counts[0]) - 30.0).abs() < 1.0, "{counts:?}");
        assert!((pct(counts[1]) - 55.0).abs() < 1.0, "{counts:?}");
        assert!((pct(counts[2]) - 15.0).abs() < 1.0, "{counts:?}");
    }

    #[test]
    fn text_pages_look_like_text() {
        let index = (0..).find(|&i| kind_of(3, i, 0) == Kind::Text).unwrap();
        let p = page(3, index, 0);
        assert!(p
            .iter()
            .all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\n'));
        let text = String::from_utf8_lossy(&p);
        assert!(text.contains('='), "{text}");
        assert!(text.contains("{\"id\":"), "{text}");
        assert!(text.lines().count() > 40, "{text}");
    }

    #[test]
    fn the_heap_compresses_about_3_5x_with_zstd_level_1() {
        // 8 MiB per seed, compressed as one stream like an image file; some
        // pages at later versions, as after dirtying.
        for seed in [0, 11, 1234] {
            let pages = 2048u64;
            let mut heap = Vec::with_capacity(pages as usize * PAGE);
            for index in 0..pages {
                heap.extend_from_slice(&page(seed, index, (index % 3) as u32));
            }
            let compressed = zstd::encode_all(&heap[..], 1).unwrap();
            let ratio = heap.len() as f64 / compressed.len() as f64;
            assert!(
                (3.2..=3.8).contains(&ratio),
                "seed {seed}: ratio {ratio:.2}"
            );
        }
    }
}
