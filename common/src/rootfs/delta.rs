//! What changed in a tree between two walks of it, as removals and (re)creations that turn
//! a copy of the first walk's tree into the second's.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::snapshot::{EntryKind, EntryStat, TreeSnapshot};

/// How far before the base walk's start a timestamp must lie for an unchanged `stat` to be
/// believed.
///
/// This is git's "racy" rule. Filesystem timestamps come from a clock that ticks once per
/// jiffy (up to 10 ms) and some filesystems round them to whole seconds, so a write that
/// lands after the walk statted an entry, yet within the same tick, can leave every field of
/// the `stat` as the walk saw it. Such a write can only have happened after the walk began,
/// so an entry whose ctime or mtime is not strictly earlier than the start minus this margin
/// is sent again whatever its `stat` says. Two seconds cover whole-second timestamps plus
/// the coarse clock's lag; what it costs is resending entries changed in the two seconds
/// before the base walk.
pub const RACY_MARGIN: Duration = Duration::from_secs(2);

/// The steps that turn the base walk's tree into the current one, in an order they can be
/// applied in: all removals, then all creations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeDelta {
    /// Paths to remove, deepest first. Removing a directory removes everything below it,
    /// so only the top of a removed subtree is listed. An entry whose type changed is
    /// removed here and created again from `changed`.
    pub removed: Vec<PathBuf>,
    /// Paths to create or replace with the current entry, parents before children.
    /// Directories among them carry only their own metadata: what is below them is listed
    /// separately.
    pub changed: Vec<PathBuf>,
}

impl TreeDelta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The delta from `base` to `now`.
///
/// An entry is changed if it is new, its type differs, any field of its `stat` differs
/// (a new inode, owner, mode, size, timestamps, link count or device), or its timestamps
/// are too close to the base walk's start to be trusted (see [`RACY_MARGIN`]). xattr
/// changes show as a new ctime, which covers opaque directories; a whiteout is a character
/// device, so a file turned into one is a type change.
///
/// When one name of a multiply-linked inode changes, all of its current names do, so that
/// the delta can rebuild the whole hard-link group: linking a new name to an existing inode
/// changes that inode's link count and ctime anyway, but a rename need not touch the
/// renamed inode's ctime.
pub fn diff(base: &TreeSnapshot, now: &TreeSnapshot) -> TreeDelta {
    let untrusted_from = base.started.saturating_sub(RACY_MARGIN);
    let is_racy = |stat: &EntryStat| stat.ctime >= untrusted_from || stat.mtime >= untrusted_from;

    let mut removed: Vec<PathBuf> = Vec::new();
    for (path, old) in &base.entries {
        let gone = now.entries.get(path).is_none_or(|new| new.kind != old.kind);
        // Entries come in walk order, so a removed subtree's entries follow its top.
        let below_removed = removed.last().is_some_and(|top| path.starts_with(top));
        if gone && !below_removed {
            removed.push(path.clone());
        }
    }
    removed.reverse();

    let mut changed: BTreeSet<&Path> = now
        .entries
        .iter()
        .filter(|(path, new)| match base.entries.get(*path) {
            None => true,
            // Where the two are equal, either one's timestamps tell whether to trust them.
            Some(old) => old != *new || is_racy(old),
        })
        .map(|(path, _)| path.as_path())
        .collect();

    let mut link_groups: HashMap<(u64, u64), Vec<&Path>> = HashMap::new();
    for (path, stat) in &now.entries {
        if stat.kind != EntryKind::Dir && stat.nlink > 1 {
            link_groups
                .entry((stat.dev, stat.ino))
                .or_default()
                .push(path);
        }
    }
    for names in link_groups.values() {
        if names.iter().any(|name| changed.contains(name)) {
            changed.extend(names);
        }
    }

    TreeDelta {
        removed,
        // The set's order is `Path`'s, component by component, as in the snapshot.
        changed: changed.into_iter().map(Path::to_path_buf).collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rootfs::snapshot::Timestamp;

    /// The base walk starts here; entries made long before it are trusted.
    const STARTED: Timestamp = Timestamp {
        secs: 1_700_000_000,
        nanos: 0,
    };
    const OLD: Timestamp = Timestamp {
        secs: 1_600_000_000,
        nanos: 0,
    };

    fn stat(kind: EntryKind, ino: u64) -> EntryStat {
        EntryStat {
            kind,
            dev: 1,
            ino,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 10,
            mtime: OLD,
            ctime: OLD,
            nlink: 1,
            rdev: 0,
        }
    }

    fn snapshot(entries: &[(&str, EntryStat)]) -> TreeSnapshot {
        TreeSnapshot {
            started: STARTED,
            entries: entries
                .iter()
                .map(|(path, stat)| (PathBuf::from(path), *stat))
                .collect(),
        }
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    /// A tree: the root, `d/` with `d/f` and `d/e/` holding `d/e/g`, and a file `h`.
    fn base_entries() -> Vec<(&'static str, EntryStat)> {
        vec![
            ("", stat(EntryKind::Dir, 1)),
            ("d", stat(EntryKind::Dir, 2)),
            ("d/e", stat(EntryKind::Dir, 3)),
            ("d/e/g", stat(EntryKind::File, 4)),
            ("d/f", stat(EntryKind::File, 5)),
            ("h", stat(EntryKind::File, 6)),
        ]
    }

    /// `base_entries` with `edit` applied to some of them; `None` drops the entry.
    fn edited(edits: &[(&str, Option<EntryStat>)]) -> Vec<(&'static str, EntryStat)> {
        base_entries()
            .into_iter()
            .filter_map(
                |(path, stat)| match edits.iter().find(|(p, _)| *p == path) {
                    Some((_, replacement)) => replacement.map(|s| (path, s)),
                    None => Some((path, stat)),
                },
            )
            .collect()
    }

    fn touched(mut stat: EntryStat) -> EntryStat {
        stat.mtime.secs += 1;
        stat.ctime.secs += 1;
        stat
    }

    #[test]
    fn unchanged_tree_gives_an_empty_delta() {
        let base = snapshot(&base_entries());
        let delta = diff(&base, &base.clone());
        assert!(delta.is_empty(), "{delta:?}");
    }

    #[test]
    fn new_entries_come_parents_first() {
        let base = snapshot(&base_entries());
        let mut entries = base_entries();
        entries.push(("n", stat(EntryKind::Dir, 10)));
        entries.push(("n/m", stat(EntryKind::File, 11)));
        entries.push(("a-b", stat(EntryKind::Symlink, 12)));
        // A new child changes its directory's mtime.
        entries[0].1 = touched(entries[0].1);
        let delta = diff(&base, &snapshot(&entries));
        assert_eq!(delta.removed, paths(&[]));
        assert_eq!(delta.changed, paths(&["", "a-b", "n", "n/m"]));
    }

    #[test]
    fn any_stat_field_reveals_a_change() {
        let base = snapshot(&base_entries());
        let f = stat(EntryKind::File, 5);
        let variants = [
            EntryStat { size: 11, ..f },
            EntryStat { mode: 0o4644, ..f },
            EntryStat { uid: 7, ..f },
            EntryStat { gid: 7, ..f },
            EntryStat { ino: 99, ..f },
            EntryStat { nlink: 2, ..f },
            EntryStat { rdev: 1, ..f },
            EntryStat {
                mtime: Timestamp { nanos: 1, ..OLD },
                ..f
            },
            EntryStat {
                ctime: Timestamp { nanos: 1, ..OLD },
                ..f
            },
        ];
        for variant in variants {
            let now = snapshot(&edited(&[("d/f", Some(variant))]));
            assert_eq!(diff(&base, &now).changed, paths(&["d/f"]), "{variant:?}");
        }
    }

    #[test]
    fn a_removed_subtree_is_listed_by_its_top_deepest_first() {
        let base = snapshot(&base_entries());
        let now = snapshot(&edited(&[
            ("", Some(touched(stat(EntryKind::Dir, 1)))),
            ("d", Some(touched(stat(EntryKind::Dir, 2)))),
            ("d/e", None),
            ("d/e/g", None),
            ("d/f", None),
            ("h", None),
        ]));
        let delta = diff(&base, &now);
        assert_eq!(delta.removed, paths(&["h", "d/f", "d/e"]));
        assert_eq!(delta.changed, paths(&["", "d"]));
    }

    #[test]
    fn a_type_change_is_a_removal_and_a_creation() {
        let base = snapshot(&base_entries());
        // A directory becomes a whiteout, a file becomes a directory with a child.
        let mut entries = edited(&[
            ("d/e", Some(stat(EntryKind::CharDevice, 3))),
            ("d/e/g", None),
            ("h", Some(stat(EntryKind::Dir, 6))),
        ]);
        entries.push(("h/x", stat(EntryKind::File, 20)));
        let delta = diff(&base, &snapshot(&entries));
        assert_eq!(delta.removed, paths(&["h", "d/e"]));
        assert_eq!(delta.changed, paths(&["d/e", "h", "h/x"]));
    }

    #[test]
    fn an_opaque_directory_is_sent_without_its_children() {
        let base = snapshot(&base_entries());
        // Setting trusted.overlay.opaque moves the ctime only.
        let mut opaque = stat(EntryKind::Dir, 2);
        opaque.ctime.secs += 1;
        let delta = diff(&base, &snapshot(&edited(&[("d", Some(opaque))])));
        assert_eq!(
            delta,
            TreeDelta {
                removed: vec![],
                changed: paths(&["d"])
            }
        );
    }

    #[test]
    fn hard_link_groups_travel_whole() {
        let base = snapshot(&base_entries());
        // A new name for h's inode raises its link count.
        let linked = EntryStat {
            nlink: 2,
            ..touched(stat(EntryKind::File, 6))
        };
        let mut entries = edited(&[("h", Some(linked))]);
        entries.push(("d/link", linked));
        entries[1].1 = touched(entries[1].1);
        let delta = diff(&base, &snapshot(&entries));
        assert_eq!(delta.changed, paths(&["d", "d/link", "h"]));

        // A renamed link whose inode kept its ctime: the other name goes along, so that the
        // destination links the two again instead of holding two copies.
        let base = snapshot(&entries);
        let mut renamed: Vec<_> = entries
            .iter()
            .filter(|(p, _)| *p != "d/link")
            .cloned()
            .collect();
        renamed.push(("d/moved", linked));
        let delta = diff(&base, &snapshot(&renamed));
        assert_eq!(delta.removed, paths(&["d/link"]));
        assert_eq!(delta.changed, paths(&["d/moved", "h"]));
    }

    #[test]
    fn racy_timestamps_are_not_trusted() {
        let racy_from = STARTED.saturating_sub(RACY_MARGIN);
        let just_before = Timestamp::new(racy_from.secs, i64::from(racy_from.nanos) - 1);
        let f = stat(EntryKind::File, 5);
        for (stat, resent) in [
            (
                EntryStat {
                    ctime: racy_from,
                    ..f
                },
                true,
            ),
            (
                EntryStat {
                    mtime: racy_from,
                    ..f
                },
                true,
            ),
            // Modified during the walk, or (with a clock stepped back) after it.
            (
                EntryStat {
                    ctime: STARTED,
                    mtime: STARTED,
                    ..f
                },
                true,
            ),
            (
                EntryStat {
                    ctime: just_before,
                    mtime: just_before,
                    ..f
                },
                false,
            ),
        ] {
            // The same stat on both walks: only the rule can tell.
            let entries = edited(&[("d/f", Some(stat))]);
            let delta = diff(&snapshot(&entries), &snapshot(&entries));
            assert_eq!(delta.changed == paths(&["d/f"]), resent, "{stat:?}");
            assert!(delta.removed.is_empty());
        }
    }
}
