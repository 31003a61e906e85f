//! The disk, image space and memory items: what a migration needs of this
//! host, from the sizes its `Hello` announced, against what is free.

use std::path::Path;

use indicatif::HumanBytes;
use migrate_common::protocol::{Hello, MemoryMode};

/// Room kept free on the state dir's filesystem beyond the estimate.
const DISK_RESERVE: u64 = 256 << 20;
/// Room kept free in the image dir beyond the container's memory: the
/// images that are not pages (a few MiB), and the rest of the tmpfs's users.
const IMAGE_RESERVE: u64 = 64 << 20;

/// What a migration needs of this host, in bytes, from the sizes its
/// `Hello` announced (sums saturate: a sender's sizes cannot wrap round to
/// a small need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Needs {
    /// On the state dir's disk: the missing layers, the upper dir, and the
    /// room kept free.
    pub disk: u64,
    /// In the image dir: the container's memory (none in post-copy, where
    /// pages come after the restore and go straight into the processes),
    /// and the room kept free.
    pub images: u64,
    /// Of the image dir's tmpfs, what is memory: the images' pages.
    pub images_in_memory: u64,
    /// Of the host's memory: the restored container's, and its images'
    /// until the restore ends.
    pub memory: u64,
}

impl Needs {
    pub fn of(hello: &Hello, missing_layer_bytes: u64) -> Self {
        let sum = |parts: &[u64]| {
            parts
                .iter()
                .try_fold(0u64, |sum, part| sum.checked_add(*part))
                .unwrap_or(u64::MAX)
        };
        let post_copy = MemoryMode::try_from(hello.mode) == Ok(MemoryMode::PostCopy);
        let pages = if post_copy { 0 } else { hello.memory_bytes };
        Self {
            disk: sum(&[missing_layer_bytes, hello.upper_bytes, DISK_RESERVE]),
            images: sum(&[pages, IMAGE_RESERVE]),
            images_in_memory: pages,
            memory: sum(&[hello.memory_bytes, pages]),
        }
    }
}

/// The disk and image space items: `free` (as measured in `dir`) against
/// `needed` for `what`.
pub(super) fn room(
    free: nix::Result<u64>,
    needed: u64,
    dir: &Path,
    what: &str,
) -> Result<String, Vec<String>> {
    match free {
        Ok(free) => {
            let room = format!(
                "{} has {} free, the migration's {what} need about {}",
                dir.display(),
                HumanBytes(free),
                HumanBytes(needed)
            );
            if free < needed {
                Err(vec![room])
            } else {
                Ok(room)
            }
        }
        Err(e) => Err(vec![format!(
            "cannot measure free space in {}: {e}",
            dir.display()
        )]),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hello(mode: MemoryMode, memory_bytes: u64, upper_bytes: u64) -> Hello {
        Hello {
            mode: mode as i32,
            memory_bytes,
            upper_bytes,
            ..Hello::default()
        }
    }

    #[test]
    fn images_count_against_the_image_space_and_the_rest_against_the_disk() {
        let needs = Needs::of(&hello(MemoryMode::StopAndCopy, 100 << 20, 5 << 20), 7 << 20);
        assert_eq!(needs.disk, (7 << 20) + (5 << 20) + DISK_RESERVE);
        assert_eq!(needs.images, (100 << 20) + IMAGE_RESERVE);
        assert_eq!(needs.memory, 200 << 20);
        // Post-copy's pages go straight into the restored processes.
        let lazy = Needs::of(&hello(MemoryMode::PostCopy, 100 << 20, 0), 0);
        assert_eq!((lazy.images, lazy.memory), (IMAGE_RESERVE, 100 << 20));
        let hybrid = Needs::of(&hello(MemoryMode::Hybrid, 100 << 20, 0), 0);
        assert_eq!(hybrid.images, (100 << 20) + IMAGE_RESERVE);
    }

    #[test]
    fn sizes_from_the_wire_cannot_wrap_round() {
        let needs = Needs::of(
            &hello(MemoryMode::PreCopy, u64::MAX - 1, u64::MAX),
            u64::MAX,
        );
        assert_eq!(
            (needs.disk, needs.images, needs.memory),
            (u64::MAX, u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn an_item_fails_when_the_need_exceeds_what_is_free() {
        let dir = Path::new("/dev/shm/migrate-dst");
        let passed = room(Ok(2 << 30), 1 << 30, dir, "images").unwrap();
        assert_eq!(
            passed,
            "/dev/shm/migrate-dst has 2.00 GiB free, the migration's images need about 1.00 GiB"
        );
        let failed = room(Ok(1 << 20), 1 << 30, dir, "images").unwrap_err();
        assert!(failed[0].contains("has 1.00 MiB free"), "{failed:?}");
        let unmeasured = room(Err(nix::Error::ENOENT), 1, dir, "images").unwrap_err();
        assert!(unmeasured[0].starts_with("cannot measure free space in /dev/shm/migrate-dst"));
    }
}
