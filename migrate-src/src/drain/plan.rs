//! Where each container of a drain goes, from what every destination said
//! in its preflight: pure, so that the rule is tested without hosts.
//!
//! Containers are placed in the drain's order. Each goes to a destination
//! that accepted it and still has room for it once the containers placed
//! before it are counted: its memory out of the destination's available
//! memory, its upper dir out of its free disk (the rootfs lands there); its
//! images (as large as its memory at most) must fit the destination's image
//! dir, which holds them only until the restore ends, so they are not
//! added up over the containers placed there. Among those, the one with the most memory left
//! wins; memory within [`MEMORY_TIE`] counts as a tie, broken by fewer
//! containers placed there so far (so that equal hosts share the work),
//! then by more disk left (within [`DISK_TIE`] a tie), then by the order of
//! `--to`.

/// Memory differences below this are noise between hosts' readings.
pub const MEMORY_TIE: u64 = 256 << 20;
/// Free disk differences below this are noise too.
pub const DISK_TIE: u64 = 1 << 30;

/// One destination's preflight answer about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Accepted {
        destination: String,
        /// The mode the migration would use.
        mode: String,
        free_bytes: u64,
        image_free_bytes: u64,
        mem_available_bytes: u64,
    },
    /// Refused, or could not be asked: why, in the destination's words.
    Refused {
        destination: String,
        reasons: Vec<String>,
    },
}

impl Answer {
    fn destination(&self) -> &str {
        match self {
            Self::Accepted { destination, .. } | Self::Refused { destination, .. } => destination,
        }
    }
}

/// A container to place, with every destination's answer (in `--to` order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub container: String,
    pub memory_bytes: u64,
    pub upper_bytes: u64,
    pub answers: Vec<Answer>,
}

/// Where one container goes, or why it stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    To {
        container: String,
        destination: String,
        mode: String,
    },
    Skipped {
        container: String,
        reasons: Vec<String>,
    },
}

impl Placement {
    pub fn container(&self) -> &str {
        match self {
            Self::To { container, .. } | Self::Skipped { container, .. } => container,
        }
    }
}

/// What a destination has left as the plan fills it.
#[derive(Debug)]
struct Room {
    destination: String,
    memory: u64,
    disk: u64,
    images: u64,
    placed: usize,
}

/// Places `candidates`, in their order.
pub fn place(candidates: &[Candidate]) -> Vec<Placement> {
    let mut rooms = rooms(candidates);
    candidates
        .iter()
        .map(|candidate| place_one(candidate, &mut rooms))
        .collect()
}

/// Each destination's room: the least it reported across its answers, as
/// later readings only see what earlier ones did not.
fn rooms(candidates: &[Candidate]) -> Vec<Room> {
    let mut rooms: Vec<Room> = Vec::new();
    for answer in candidates.iter().flat_map(|c| &c.answers) {
        let index = match rooms
            .iter()
            .position(|r| r.destination == answer.destination())
        {
            Some(index) => index,
            None => {
                rooms.push(Room {
                    destination: answer.destination().to_owned(),
                    memory: u64::MAX,
                    disk: u64::MAX,
                    images: u64::MAX,
                    placed: 0,
                });
                rooms.len() - 1
            }
        };
        if let Answer::Accepted {
            free_bytes,
            image_free_bytes,
            mem_available_bytes,
            ..
        } = answer
        {
            let room = &mut rooms[index];
            room.memory = room.memory.min(*mem_available_bytes);
            room.disk = room.disk.min(*free_bytes);
            room.images = room.images.min(*image_free_bytes);
        }
    }
    rooms
}

fn place_one(candidate: &Candidate, rooms: &mut [Room]) -> Placement {
    let disk_needed = candidate.upper_bytes;
    let images_needed = candidate.memory_bytes;
    let mut reasons = Vec::new();
    let mut fitting: Vec<(usize, &str)> = Vec::new();
    for answer in &candidate.answers {
        let Some(index) = rooms
            .iter()
            .position(|r| r.destination == answer.destination())
        else {
            continue;
        };
        match answer {
            Answer::Refused {
                destination,
                reasons: refused,
            } => reasons.extend(refused.iter().map(|r| format!("{destination}: {r}"))),
            Answer::Accepted {
                destination, mode, ..
            } => {
                let room = &rooms[index];
                if room.images < images_needed {
                    reasons.push(format!(
                        "{destination}: accepted, but its image dir has {} free and this \
                         container's images need up to {}",
                        indicatif::HumanBytes(room.images),
                        indicatif::HumanBytes(images_needed)
                    ));
                } else if room.memory >= candidate.memory_bytes && room.disk >= disk_needed {
                    fitting.push((index, mode));
                } else {
                    reasons.push(format!(
                        "{destination}: accepted, but after the containers placed there before \
                         it has {} of memory and {} of disk left, and this one needs {} and {}",
                        indicatif::HumanBytes(room.memory),
                        indicatif::HumanBytes(room.disk),
                        indicatif::HumanBytes(candidate.memory_bytes),
                        indicatif::HumanBytes(disk_needed)
                    ));
                }
            }
        }
    }
    let Some(&(best, mode)) = pick(&fitting, rooms) else {
        if reasons.is_empty() {
            reasons.push("no destination was asked".to_owned());
        }
        return Placement::Skipped {
            container: candidate.container.clone(),
            reasons,
        };
    };
    let room = &mut rooms[best];
    room.memory -= candidate.memory_bytes;
    room.disk -= disk_needed;
    room.placed += 1;
    Placement::To {
        container: candidate.container.clone(),
        destination: room.destination.clone(),
        mode: mode.to_owned(),
    }
}

/// The best of `fitting` (indices into `rooms`, in `--to` order).
fn pick<'a>(fitting: &'a [(usize, &'a str)], rooms: &[Room]) -> Option<&'a (usize, &'a str)> {
    let most_memory = fitting.iter().map(|(i, _)| rooms[*i].memory).max()?;
    let near: Vec<&(usize, &str)> = fitting
        .iter()
        .filter(|(i, _)| rooms[*i].memory >= most_memory.saturating_sub(MEMORY_TIE))
        .collect();
    let fewest = near.iter().map(|(i, _)| rooms[*i].placed).min()?;
    let least_used: Vec<&(usize, &str)> = near
        .into_iter()
        .filter(|(i, _)| rooms[*i].placed == fewest)
        .collect();
    let most_disk = least_used.iter().map(|(i, _)| rooms[*i].disk).max()?;
    least_used
        .into_iter()
        .find(|(i, _)| rooms[*i].disk >= most_disk.saturating_sub(DISK_TIE))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn yes(destination: &str, memory: u64, disk: u64) -> Answer {
        Answer::Accepted {
            destination: destination.into(),
            mode: "stop-and-copy".into(),
            free_bytes: disk,
            image_free_bytes: memory,
            mem_available_bytes: memory,
        }
    }

    fn with_image_space(answer: Answer, images: u64) -> Answer {
        match answer {
            Answer::Accepted {
                destination,
                mode,
                free_bytes,
                mem_available_bytes,
                ..
            } => Answer::Accepted {
                destination,
                mode,
                free_bytes,
                image_free_bytes: images,
                mem_available_bytes,
            },
            refused => refused,
        }
    }

    fn no(destination: &str, why: &str) -> Answer {
        Answer::Refused {
            destination: destination.into(),
            reasons: vec![why.into()],
        }
    }

    fn candidate(name: &str, memory: u64, answers: Vec<Answer>) -> Candidate {
        Candidate {
            container: name.into(),
            memory_bytes: memory,
            upper_bytes: 0,
            answers,
        }
    }

    fn destinations(plan: &[Placement]) -> Vec<&str> {
        plan.iter()
            .map(|p| match p {
                Placement::To { destination, .. } => destination.as_str(),
                Placement::Skipped { .. } => "-",
            })
            .collect()
    }

    #[test]
    fn goes_where_there_is_most_memory() {
        let plan = place(&[candidate(
            "c1",
            GIB,
            vec![yes("a", 4 * GIB, 100 * GIB), yes("b", 8 * GIB, 100 * GIB)],
        )]);
        assert_eq!(destinations(&plan), ["b"]);
    }

    #[test]
    fn earlier_placements_use_up_room() {
        // b has more at first; after 3 GiB there, a has more.
        let both = || vec![yes("a", 6 * GIB, 100 * GIB), yes("b", 8 * GIB, 100 * GIB)];
        let plan = place(&[
            candidate("big", 3 * GIB, both()),
            candidate("next", GIB, both()),
        ]);
        assert_eq!(destinations(&plan), ["b", "a"]);
    }

    #[test]
    fn equal_hosts_share_small_containers() {
        let both = || vec![yes("a", 8 * GIB, 100 * GIB), yes("b", 8 * GIB, 100 * GIB)];
        let plan = place(&[
            candidate("c1", 1 << 20, both()),
            candidate("c2", 1 << 20, both()),
            candidate("c3", 1 << 20, both()),
        ]);
        assert_eq!(destinations(&plan), ["a", "b", "a"]);
    }

    #[test]
    fn a_memory_tie_goes_to_more_disk() {
        let plan = place(&[candidate(
            "c1",
            1 << 20,
            vec![
                yes("a", 8 * GIB, 10 * GIB),
                yes("b", 8 * GIB - (1 << 20), 50 * GIB),
            ],
        )]);
        assert_eq!(destinations(&plan), ["b"]);
    }

    #[test]
    fn small_differences_in_disk_are_a_tie() {
        let plan = place(&[candidate(
            "c1",
            1 << 20,
            vec![
                yes("a", 8 * GIB, 50 * GIB),
                yes("b", 8 * GIB, 50 * GIB + (4 << 20)),
            ],
        )]);
        assert_eq!(destinations(&plan), ["a"]);
    }

    #[test]
    fn refused_everywhere_is_skipped_with_every_reason() {
        let plan = place(&[candidate(
            "c1",
            GIB,
            vec![no("a", "bind mount source /data"), no("b", "runc too old")],
        )]);
        let Placement::Skipped { reasons, .. } = &plan[0] else {
            panic!("{plan:?}")
        };
        assert_eq!(
            reasons,
            &[
                "a: bind mount source /data".to_owned(),
                "b: runc too old".to_owned()
            ]
        );
    }

    #[test]
    fn refused_by_one_goes_to_the_other() {
        let plan = place(&[candidate(
            "c1",
            GIB,
            vec![no("a", "full"), yes("b", 2 * GIB, 100 * GIB)],
        )]);
        assert_eq!(destinations(&plan), ["b"]);
    }

    #[test]
    fn no_room_left_is_skipped_and_says_so() {
        let one = || vec![yes("a", 5 * GIB, 100 * GIB)];
        let plan = place(&[
            candidate("c1", 3 * GIB, one()),
            candidate("c2", 3 * GIB, one()),
        ]);
        assert_eq!(destinations(&plan), ["a", "-"]);
        let Placement::Skipped { reasons, .. } = &plan[1] else {
            panic!("{plan:?}")
        };
        assert!(reasons[0].contains("placed there before"), "{reasons:?}");
    }

    #[test]
    fn disk_counts_the_upper_dir_and_the_image_dir_the_images() {
        // The images go to the image dir, not the disk: 1 GiB of memory
        // and 1 GiB of upper dir fit 1.5 GiB of disk.
        let mut c = candidate("c1", GIB, vec![yes("a", 8 * GIB, 3 * GIB / 2)]);
        c.upper_bytes = GIB;
        assert_eq!(destinations(&place(&[c.clone()])), ["a"]);
        c.upper_bytes = 2 * GIB;
        assert_eq!(destinations(&place(&[c])), ["-"]);
    }

    #[test]
    fn images_must_fit_the_image_dir_each_alone() {
        let small = || vec![with_image_space(yes("a", 8 * GIB, 100 * GIB), GIB)];
        let plan = place(&[
            candidate("big", 2 * GIB, small()),
            candidate("c1", GIB, small()),
            candidate("c2", GIB, small()),
        ]);
        // The image dir empties after each restore: two containers of its
        // size both fit, one larger does not.
        assert_eq!(destinations(&plan), ["-", "a", "a"]);
        let Placement::Skipped { reasons, .. } = &plan[0] else {
            panic!("{plan:?}")
        };
        assert!(
            reasons[0].contains("image dir has 1.00 GiB free"),
            "{reasons:?}"
        );
    }

    #[test]
    fn a_destination_reports_the_least_it_said() {
        // Its second answer saw less memory: that reading counts.
        let plan = place(&[
            candidate(
                "c1",
                GIB,
                vec![yes("a", 8 * GIB, 100 * GIB), yes("b", 6 * GIB, 100 * GIB)],
            ),
            candidate(
                "c2",
                GIB,
                vec![yes("a", 2 * GIB, 100 * GIB), yes("b", 6 * GIB, 100 * GIB)],
            ),
        ]);
        assert_eq!(destinations(&plan), ["b", "b"]);
    }

    #[test]
    fn nothing_to_place_is_an_empty_plan() {
        assert!(place(&[]).is_empty());
    }
}
