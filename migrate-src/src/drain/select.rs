//! Which containers a drain moves (`--filter`), and in what order
//! (`--order`): pure, tested without runc.

use std::cmp::Reverse;

use glob::Pattern;

/// `--order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Order {
    /// Largest memory first: the containers that take longest go while the
    /// destinations have the most room, and ties go by name.
    #[default]
    Memory,
    /// By container id.
    Name,
    /// In the order of the `--filter` patterns each first matches (by name
    /// within one); by name without `--filter`.
    Given,
}

/// `--filter` patterns: a container is drained if any matches its id, or
/// if there are none.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    patterns: Vec<Pattern>,
}

#[derive(Debug, thiserror::Error)]
#[error("--filter {pattern:?}: {source}")]
pub struct FilterError {
    pattern: String,
    #[source]
    source: glob::PatternError,
}

impl Filter {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, FilterError> {
        let patterns = patterns
            .iter()
            .map(|p| {
                Pattern::new(p.as_ref()).map_err(|source| FilterError {
                    pattern: p.as_ref().to_owned(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// The index of the first pattern matching `id` (0 without patterns).
    pub fn rank(&self, id: &str) -> Option<usize> {
        if self.patterns.is_empty() {
            return Some(0);
        }
        self.patterns.iter().position(|p| p.matches(id))
    }
}

/// A container the drain may move, as the runc root lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub memory_bytes: u64,
}

/// The ids of `listed` that `filter` keeps, in `order`.
pub fn select(listed: &[Listed], filter: &Filter, order: Order) -> Vec<String> {
    let mut kept: Vec<(usize, &Listed)> = listed
        .iter()
        .filter_map(|c| filter.rank(&c.id).map(|rank| (rank, c)))
        .collect();
    match order {
        Order::Memory => kept.sort_by(|(_, a), (_, b)| {
            (Reverse(a.memory_bytes), &a.id).cmp(&(Reverse(b.memory_bytes), &b.id))
        }),
        Order::Name => kept.sort_by(|(_, a), (_, b)| a.id.cmp(&b.id)),
        Order::Given => kept.sort_by(|(ra, a), (rb, b)| (ra, &a.id).cmp(&(rb, &b.id))),
    }
    kept.into_iter().map(|(_, c)| c.id.clone()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn listed() -> Vec<Listed> {
        [("web2", 10), ("db1", 300), ("web1", 10), ("cache", 50)]
            .into_iter()
            .map(|(id, memory_bytes)| Listed {
                id: id.into(),
                memory_bytes,
            })
            .collect()
    }

    #[test]
    fn memory_order_is_largest_first_then_by_name() {
        let ids = select(&listed(), &Filter::default(), Order::Memory);
        assert_eq!(ids, ["db1", "cache", "web1", "web2"]);
    }

    #[test]
    fn name_order() {
        let ids = select(&listed(), &Filter::default(), Order::Name);
        assert_eq!(ids, ["cache", "db1", "web1", "web2"]);
    }

    #[test]
    fn given_order_follows_the_filters() {
        let filter = Filter::new(&["web*", "db*"]).unwrap();
        let ids = select(&listed(), &filter, Order::Given);
        assert_eq!(ids, ["web1", "web2", "db1"]);
    }

    #[test]
    fn a_filter_keeps_only_what_matches() {
        let filter = Filter::new(&["web?"]).unwrap();
        let ids = select(&listed(), &filter, Order::Memory);
        assert_eq!(ids, ["web1", "web2"]);
        let none = Filter::new(&["nothing-*"]).unwrap();
        assert!(select(&listed(), &none, Order::Name).is_empty());
    }

    #[test]
    fn classes_and_wildcards() {
        let filter = Filter::new(&["[cd]*"]).unwrap();
        assert_eq!(select(&listed(), &filter, Order::Name), ["cache", "db1"]);
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_it() {
        let e = Filter::new(&["web[", "ok"]).unwrap_err();
        assert!(e.to_string().contains("web["), "{e}");
    }
}
