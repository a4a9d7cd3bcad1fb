//! The GF(2^8) systematic Cauchy Reed-Solomon codec (ISA-L's construction).
//!
//! Shards 0..k are the data; parity shard p is sum over j of C[p][j] * data[j] with C the
//! Cauchy matrix of `field::cauchy_parity`. To rebuild missing data shards from k present
//! shards (the sources), the k x k rows of [I; C] for the sources are inverted; the rows
//! of the inverse for the missing data shards, applied to the sources, give exactly those
//! shards. Inverses are cached per set of sources, so a decode is normally one pass of
//! the multiply-accumulate kernel over the sources.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::kernels::{self, Kernel};
use super::{CodeParams, ErasureCodec, ErasureError, data_shards, distinct, field, join};

/// Decode matrices kept per codec. A matrix is at most 63 x 63 bytes, so the cache holds at
/// most about 1 MiB; the patterns a fleet actually sees (one or two nodes slow or down)
/// number far fewer, and a miss costs one k^3 inversion (microseconds at k = 10).
const DECODE_CACHE_CAP: usize = 256;

/// How to rebuild the missing data shards from one set of k present shards.
struct DecodePlan {
    /// The k shard indices read, ascending.
    sources: Vec<usize>,
    /// The data shard indices rebuilt, ascending.
    missing: Vec<usize>,
    /// `missing.len()` x k coefficients, row-major: row r rebuilds `missing[r]`.
    rows: Vec<u8>,
}

/// k data shards plus M - k parity shards of a Cauchy code over GF(2^8).
pub struct Gf256Codec {
    params: CodeParams,
    kernel: Kernel,
    /// The (M - k) x k parity rows of the encoding matrix, row-major.
    parity: Vec<u8>,
    /// Decode plans keyed by the bit mask of their sources.
    plans: Mutex<HashMap<u64, Arc<DecodePlan>>>,
}

impl Gf256Codec {
    /// The codec for `params`, with the fastest kernel this CPU runs.
    pub fn new(params: CodeParams) -> Self {
        Self::with_kernel(params, Kernel::detect())
    }

    /// The codec with a chosen kernel (benchmarks and tests compare them). A kernel this
    /// CPU cannot run is replaced by the scalar one at each call, so this is always safe.
    pub fn with_kernel(params: CodeParams, kernel: Kernel) -> Self {
        Self {
            params,
            kernel,
            parity: field::cauchy_parity(params.data(), params.total()),
            plans: Mutex::new(HashMap::new()),
        }
    }

    pub fn kernel(&self) -> Kernel {
        if self.kernel.is_available() {
            self.kernel
        } else {
            Kernel::Scalar
        }
    }

    /// The plan for reading `sources` (k ascending indices with every present data shard
    /// among them), from the cache or computed and cached.
    fn plan(&self, sources: &[usize]) -> Arc<DecodePlan> {
        let key = sources.iter().fold(0u64, |mask, &i| mask | 1 << i);
        if let Some(plan) = self.lock_plans().get(&key) {
            return plan.clone();
        }
        // Computed outside the lock: two threads missing at once both compute, harmlessly.
        let plan = Arc::new(self.compute_plan(sources));
        let mut plans = self.lock_plans();
        if plans.len() >= DECODE_CACHE_CAP {
            // The cap only has to bound memory; which entry goes barely matters, since a
            // recomputation is cheap. HashMap order is effectively random.
            if let Some(&victim) = plans.keys().next() {
                plans.remove(&victim);
            }
        }
        plans.insert(key, plan.clone());
        plan
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<DecodePlan>>> {
        // The map is valid after any panic (inserts and removes are single calls), so a
        // poisoned lock is still usable.
        self.plans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn compute_plan(&self, sources: &[usize]) -> DecodePlan {
        let k = self.params.data();
        debug_assert_eq!(sources.len(), k);
        // The rows of [I; C] for the sources.
        let mut matrix = vec![0u8; k * k];
        for (row, &index) in matrix.chunks_exact_mut(k).zip(sources) {
            if index < k {
                row[index] = 1;
            } else {
                row.copy_from_slice(&self.parity[(index - k) * k..(index - k + 1) * k]);
            }
        }
        let inverse = field::invert(&matrix, k)
            .expect("every k rows of a systematic Cauchy matrix are independent");
        let missing: Vec<usize> = (0..k).filter(|i| !sources.contains(i)).collect();
        let rows = missing
            .iter()
            .flat_map(|&m| inverse[m * k..(m + 1) * k].iter().copied())
            .collect();
        DecodePlan {
            sources: sources.to_vec(),
            missing,
            rows,
        }
    }
}

impl ErasureCodec for Gf256Codec {
    fn params(&self) -> CodeParams {
        self.params
    }

    fn encode(&self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
        let mut shards = data_shards(self.params, chunk);
        let shard_len = self.params.shard_len(chunk.len());
        // One allocation each (`vec![v; n]` would clone, i.e. memcpy, the zeros n - 1 times).
        let mut parity: Vec<Vec<u8>> = (0..self.params.parity())
            .map(|_| vec![0u8; shard_len])
            .collect();
        {
            let inputs: Vec<&[u8]> = shards.iter().map(Vec::as_slice).collect();
            let mut outputs: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            kernels::dot(self.kernel, &self.parity, &inputs, &mut outputs);
        }
        shards.extend(parity);
        Ok(shards)
    }

    fn decode(&self, chunk_len: usize, shards: &[(usize, &[u8])]) -> Result<Vec<u8>, ErasureError> {
        let slots = distinct(self.params, chunk_len, shards)?;
        let k = self.params.data();
        if slots[..k].iter().all(Option::is_some) {
            return Ok(join(slots[..k].iter().flatten(), chunk_len));
        }
        // Every present data shard, then the first present parity shards up to k in all:
        // only the missing data shards are computed, and from as few parity shards as
        // possible (each data source is copied through rather than solved for).
        let sources: Vec<usize> = (0..self.params.total())
            .filter(|&i| slots[i].is_some())
            .take(k)
            .collect();
        let plan = self.plan(&sources);

        // The chunk: present data shards copied in place, missing ones computed straight
        // into their place (zeroed first only because safe Rust wants initialised bytes).
        let shard_len = self.params.shard_len(chunk_len);
        let mut chunk = Vec::with_capacity(k * shard_len);
        for slot in &slots[..k] {
            match slot {
                Some(bytes) => chunk.extend_from_slice(bytes),
                None => chunk.resize(chunk.len() + shard_len, 0),
            }
        }
        let inputs: Vec<&[u8]> = plan
            .sources
            .iter()
            .map(|&i| slots[i].expect("sources are present"))
            .collect();
        let mut outputs: Vec<&mut [u8]> = chunk
            .chunks_exact_mut(shard_len)
            .enumerate()
            .filter(|(i, _)| plan.missing.binary_search(i).is_ok())
            .map(|(_, shard)| shard)
            .collect();
        kernels::dot(self.kernel, &plan.rows, &inputs, &mut outputs);
        chunk.truncate(chunk_len);
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes with no short period (167 is any odd multiplier; the high byte
    /// of the index breaks the period of 256).
    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(167).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    /// Every k-subset of 0..total, ascending, for the cache tests.
    fn source_sets(k: usize, total: usize) -> Vec<Vec<usize>> {
        (0u64..1 << total)
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..total).filter(|i| mask >> i & 1 == 1).collect())
            .collect()
    }

    #[test]
    fn the_plan_cache_stays_bounded_and_correct_past_its_cap() {
        // 10-of-14 has 1001 source sets, about four times the cap.
        let codec = Gf256Codec::new(CodeParams::new(10, 14).unwrap());
        let data = bytes(7_001, 1);
        let shards = codec.encode(&data).unwrap();
        let sets = source_sets(10, 14);
        assert!(sets.len() > 2 * DECODE_CACHE_CAP);
        for round in 0..2 {
            for set in &sets {
                let chosen: Vec<(usize, &[u8])> =
                    set.iter().map(|&i| (i, shards[i].as_slice())).collect();
                assert_eq!(
                    codec.decode(data.len(), &chosen).unwrap(),
                    data,
                    "{round} {set:?}"
                );
                assert!(codec.lock_plans().len() <= DECODE_CACHE_CAP);
            }
        }
        // The join of the data shards never needs a plan; every other set made one.
        assert_eq!(codec.lock_plans().len(), DECODE_CACHE_CAP);
    }

    #[test]
    fn one_codec_decodes_on_many_threads_at_once() {
        let codec = Gf256Codec::new(CodeParams::new(4, 7).unwrap());
        let data = bytes(100_003, 2);
        let shards = codec.encode(&data).unwrap();
        let sets = source_sets(4, 7);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (codec, data, shards, sets) = (&codec, &data, &shards, &sets);
                scope.spawn(move || {
                    for set in sets.iter().skip(t).chain(sets.iter()) {
                        let chosen: Vec<(usize, &[u8])> =
                            set.iter().map(|&i| (i, shards[i].as_slice())).collect();
                        assert_eq!(&codec.decode(data.len(), &chosen).unwrap(), data);
                    }
                });
            }
        });
    }
}
