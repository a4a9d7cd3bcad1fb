//! Placement of a chunk's shards on fleet nodes by rendezvous (highest random weight)
//! hashing.
//!
//! Every node gets a score for every chunk from xxh3 over (chunk name, node id); a chunk's
//! M shards go to the M highest-scoring nodes, shard i to the node of rank i. Scores do not
//! depend on which other nodes exist, so when a node leaves, every other node keeps its
//! place in every chunk's ranking and only the chunks that ranked the departed node in
//! their top M see a change: one new node enters their top M. Readers therefore ask the top
//! M nodes and read each shard's index from its frame rather than from the rank, so a shard
//! that stayed put is still found after ranks below it shifted; only the departed node's
//! shard has to move (the next fill writes it to the newcomer).
//!
//! Weights use the logarithmic method: score = -weight / ln(u) with u uniform in (0, 1)
//! from the hash, which makes each node the first choice for a share of chunks proportional
//! to its weight. Its share of all M shards is less than proportional for heavy nodes:
//! a node holds at most one shard of a chunk, so the ranks below the first go more often to
//! the lighter ones (20 nodes, M = 5, one of weight 2: 8.6% of the shards, not 9.5%).
//! Size heavy nodes' capacity by that, or keep weights close.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::chunk::ChunkName;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("node id {0:?} appears twice")]
    DuplicateId(String),
    #[error("node {id:?} has weight {weight}; weights must be finite and positive")]
    BadWeight { id: String, weight: f64 },
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub weight: f64,
}

impl Member {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            weight: 1.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Placement {
    /// xxh3 of each node id, used as the seed of its per-chunk hash.
    seeds: Vec<u64>,
    weights: Vec<f64>,
    uniform: bool,
}

impl Placement {
    pub fn new(members: &[Member]) -> Result<Self, PlacementError> {
        let mut seen = std::collections::HashSet::new();
        for m in members {
            if !seen.insert(m.id.as_str()) {
                return Err(PlacementError::DuplicateId(m.id.clone()));
            }
            if !(m.weight.is_finite() && m.weight > 0.0) {
                return Err(PlacementError::BadWeight {
                    id: m.id.clone(),
                    weight: m.weight,
                });
            }
        }
        Ok(Self {
            seeds: members.iter().map(|m| xxh3_64(m.id.as_bytes())).collect(),
            weights: members.iter().map(|m| m.weight).collect(),
            uniform: members.iter().all(|m| m.weight == members[0].weight),
        })
    }

    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    fn score(&self, chunk: &ChunkName, node: usize) -> f64 {
        let hash = xxh3_64_with_seed(chunk.as_bytes(), self.seeds[node]);
        if self.uniform {
            // With equal weights the ranking is the ranking of the hashes themselves.
            return hash as f64;
        }
        // u in (0, 1): the top 53 bits, offset by half a step so that it is never 0.
        let u = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        -self.weights[node] / u.ln()
    }

    /// The `count` (or all, if fewer) highest-ranked nodes for `chunk`, best first, as
    /// indices into the member list given to `new`.
    pub fn rank(&self, chunk: &ChunkName, count: usize) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> =
            (0..self.len()).map(|n| (self.score(chunk, n), n)).collect();
        let count = count.min(scored.len());
        let by_score_desc =
            |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if count < scored.len() && count > 0 {
            scored.select_nth_unstable_by(count - 1, by_score_desc);
        }
        scored.truncate(count);
        scored.sort_unstable_by(by_score_desc);
        scored.into_iter().map(|(_, n)| n).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("node-{i}"))).collect()
    }

    fn names(n: u32) -> Vec<ChunkName> {
        (0..n).map(|i| ChunkName::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn ranks_are_distinct_and_deterministic() {
        let placement = Placement::new(&members(20)).unwrap();
        for name in names(200) {
            let ranked = placement.rank(&name, 5);
            assert_eq!(ranked.len(), 5);
            assert_eq!(ranked.iter().collect::<HashSet<_>>().len(), 5);
            assert_eq!(ranked, placement.rank(&name, 5));
            // The top 5 are the first 5 of the full ranking.
            assert_eq!(ranked, placement.rank(&name, 20)[..5]);
        }
        assert_eq!(placement.rank(&names(1)[0], 50).len(), 20);
    }

    #[test]
    fn removing_a_node_moves_only_its_shards() {
        let n = 20;
        let all = members(n);
        let before = Placement::new(&all).unwrap();
        let gone = 7;
        let rest: Vec<Member> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gone)
            .map(|(_, m)| m.clone())
            .collect();
        let after = Placement::new(&rest).unwrap();
        let (mut slots, mut moved) = (0, 0);
        for name in names(20_000) {
            let old: HashSet<&str> = before
                .rank(&name, 5)
                .into_iter()
                .map(|i| all[i].id.as_str())
                .collect();
            let new: HashSet<&str> = after
                .rank(&name, 5)
                .into_iter()
                .map(|i| rest[i].id.as_str())
                .collect();
            // Every node that held a shard and is still there still holds it.
            let kept = old
                .iter()
                .filter(|id| **id != "node-7")
                .all(|id| new.contains(id));
            assert!(kept, "a surviving node lost a shard of {name}");
            moved += old.difference(&new).count();
            slots += 5;
        }
        let share = moved as f64 / slots as f64;
        assert!(
            (share - 1.0 / n as f64).abs() < 0.01,
            "moved {share}, expected about {}",
            1.0 / n as f64
        );
    }

    #[test]
    fn adding_a_node_takes_about_its_share() {
        let before = Placement::new(&members(10)).unwrap();
        let after = Placement::new(&members(11)).unwrap();
        let mut changed = 0;
        let total = 20_000;
        for name in names(total) {
            let old: HashSet<usize> = before.rank(&name, 5).into_iter().collect();
            let new: HashSet<usize> = after.rank(&name, 5).into_iter().collect();
            changed += new.difference(&old).count();
        }
        let share = changed as f64 / (total as f64 * 5.0);
        assert!((share - 1.0 / 11.0).abs() < 0.01, "moved {share}");
    }

    #[test]
    fn load_follows_weights() {
        let mut nodes = members(4);
        nodes[0].weight = 3.0;
        let placement = Placement::new(&nodes).unwrap();
        let mut first: HashMap<usize, usize> = HashMap::new();
        for name in names(30_000) {
            *first.entry(placement.rank(&name, 1)[0]).or_default() += 1;
        }
        // Shares of the top rank should be 3:1:1:1.
        let heavy = first[&0] as f64 / 30_000.0;
        assert!((heavy - 0.5).abs() < 0.02, "heavy node got {heavy}");
    }

    #[test]
    fn bad_membership_is_refused() {
        assert!(matches!(
            Placement::new(&[Member::new("a"), Member::new("a")]),
            Err(PlacementError::DuplicateId(_))
        ));
        let bad = Member {
            id: "b".into(),
            weight: 0.0,
        };
        assert!(matches!(
            Placement::new(&[bad]),
            Err(PlacementError::BadWeight { .. })
        ));
    }
}
