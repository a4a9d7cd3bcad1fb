//! Erasure coding of chunks into shards.
//!
//! A chunk is cut into k data shards (the last padded with zeros) and M - k parity shards;
//! any k of the M rebuild it. When M - k = 1 the parity is the XOR of the data shards (the
//! paper's production 4-of-5 code); otherwise Reed-Solomon over GF(2^16) from
//! reed-solomon-simd. Reading the k data shards needs no decoding at all: they are the
//! chunk, cut in pieces.

use serde::{Deserialize, Serialize};

/// Shards are padded to a multiple of this many bytes: reed-solomon-simd needs an even
/// length and runs fastest on 64-byte multiples, and XOR vectorises over them.
pub const SHARD_ALIGN: usize = 64;

/// Largest M the shard frame can describe.
pub const MAX_TOTAL_SHARDS: u8 = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    #[error("a code needs 1 <= k < M <= {MAX_TOTAL_SHARDS}, not {data}-of-{total}")]
    BadParams { data: usize, total: usize },
    #[error("{have} distinct shards, {need} needed")]
    TooFewShards { have: usize, need: usize },
    #[error("shard {index} has {len} bytes, expected {expected}")]
    ShardLength {
        index: usize,
        len: usize,
        expected: usize,
    },
    #[error("shard index {index} is outside the code's {total} shards")]
    ShardIndex { index: usize, total: usize },
    #[error("reed-solomon: {0}")]
    ReedSolomon(String),
}

/// k-of-M: `data` shards carry the chunk, `total - data` carry parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CodeParams {
    pub data: u8,
    pub total: u8,
}

impl CodeParams {
    pub fn new(data: usize, total: usize) -> Result<Self, ErasureError> {
        if data == 0 || total <= data || total > usize::from(MAX_TOTAL_SHARDS) {
            return Err(ErasureError::BadParams { data, total });
        }
        Ok(Self {
            data: data as u8,
            total: total as u8,
        })
    }

    pub fn data(&self) -> usize {
        usize::from(self.data)
    }

    pub fn total(&self) -> usize {
        usize::from(self.total)
    }

    pub fn parity(&self) -> usize {
        self.total() - self.data()
    }

    pub fn codec(&self) -> CodecKind {
        if self.parity() == 1 {
            CodecKind::Xor
        } else {
            CodecKind::ReedSolomon
        }
    }

    /// Bytes in each shard of a chunk of `chunk_len` bytes.
    pub fn shard_len(&self, chunk_len: usize) -> usize {
        chunk_len.div_ceil(self.data()).div_ceil(SHARD_ALIGN).max(1) * SHARD_ALIGN
    }
}

impl Default for CodeParams {
    /// 4-of-5, the paper's production code.
    fn default() -> Self {
        Self { data: 4, total: 5 }
    }
}

/// Which parity computation a shard was made with; recorded in every shard frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodecKind {
    Xor = 0,
    ReedSolomon = 1,
}

impl CodecKind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Xor),
            1 => Some(Self::ReedSolomon),
            _ => None,
        }
    }
}

/// Splits chunks into shards and rebuilds them.
pub trait ErasureCodec: Send + Sync {
    fn params(&self) -> CodeParams;

    /// The M shards of `chunk`, data shards first, each `shard_len(chunk.len())` bytes.
    fn encode(&self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError>;

    /// Rebuilds a chunk of `chunk_len` bytes from shards given as (index, bytes), in any
    /// order; duplicates are ignored and any k distinct indices suffice.
    fn decode(&self, chunk_len: usize, shards: &[(usize, &[u8])]) -> Result<Vec<u8>, ErasureError>;
}

/// The codec for `params`: XOR for single parity, Reed-Solomon otherwise.
pub fn codec_for(params: CodeParams) -> Box<dyn ErasureCodec> {
    match params.codec() {
        CodecKind::Xor => Box::new(XorCodec::new(params)),
        CodecKind::ReedSolomon => Box::new(ReedSolomonCodec::new(params)),
    }
}

/// Cuts a chunk into k zero-padded data shards.
fn data_shards(params: CodeParams, chunk: &[u8]) -> Vec<Vec<u8>> {
    let shard_len = params.shard_len(chunk.len());
    (0..params.data())
        .map(|i| {
            let start = (i * shard_len).min(chunk.len());
            let end = ((i + 1) * shard_len).min(chunk.len());
            let mut shard = Vec::with_capacity(shard_len);
            shard.extend_from_slice(&chunk[start..end]);
            shard.resize(shard_len, 0);
            shard
        })
        .collect()
}

/// The first copy of each shard index, checked for range and length.
fn distinct<'a>(
    params: CodeParams,
    chunk_len: usize,
    shards: &[(usize, &'a [u8])],
) -> Result<Vec<Option<&'a [u8]>>, ErasureError> {
    let expected = params.shard_len(chunk_len);
    let mut slots = vec![None; params.total()];
    for &(index, bytes) in shards {
        if index >= params.total() {
            return Err(ErasureError::ShardIndex {
                index,
                total: params.total(),
            });
        }
        if bytes.len() != expected {
            return Err(ErasureError::ShardLength {
                index,
                len: bytes.len(),
                expected,
            });
        }
        slots[index].get_or_insert(bytes);
    }
    let have = slots.iter().flatten().count();
    if have < params.data() {
        return Err(ErasureError::TooFewShards {
            have,
            need: params.data(),
        });
    }
    Ok(slots)
}

/// Concatenates k data shards into the chunk.
fn join(data: impl Iterator<Item = impl AsRef<[u8]>>, chunk_len: usize) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(chunk_len + SHARD_ALIGN);
    for shard in data {
        chunk.extend_from_slice(shard.as_ref());
    }
    chunk.truncate(chunk_len);
    chunk
}

/// `dst ^= src`, over 64-byte blocks so that the compiler vectorises it.
fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst
        .chunks_exact_mut(SHARD_ALIGN)
        .zip(src.chunks_exact(SHARD_ALIGN))
    {
        for (x, y) in d.iter_mut().zip(s) {
            *x ^= y;
        }
    }
}

/// k data shards plus one XOR parity shard.
pub struct XorCodec {
    params: CodeParams,
}

impl XorCodec {
    /// Panics unless `params` has exactly one parity shard.
    pub fn new(params: CodeParams) -> Self {
        assert_eq!(
            params.parity(),
            1,
            "XOR parity covers exactly one lost shard"
        );
        Self { params }
    }
}

impl ErasureCodec for XorCodec {
    fn params(&self) -> CodeParams {
        self.params
    }

    fn encode(&self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
        let mut shards = data_shards(self.params, chunk);
        let mut parity = shards[0].clone();
        for shard in &shards[1..] {
            xor_into(&mut parity, shard);
        }
        shards.push(parity);
        Ok(shards)
    }

    fn decode(&self, chunk_len: usize, shards: &[(usize, &[u8])]) -> Result<Vec<u8>, ErasureError> {
        let slots = distinct(self.params, chunk_len, shards)?;
        let k = self.params.data();
        let Some(missing) = slots[..k].iter().position(Option::is_none) else {
            return Ok(join(slots[..k].iter().flatten(), chunk_len));
        };
        // Exactly one data shard is missing (at least k of k + 1 are present): it is the
        // parity XOR every other data shard.
        let mut rebuilt = slots[k]
            .expect("parity present when a data shard is missing")
            .to_vec();
        for (i, shard) in slots[..k].iter().enumerate() {
            if i != missing {
                xor_into(&mut rebuilt, shard.expect("all other data shards present"));
            }
        }
        let rebuilt = Some(rebuilt.as_slice());
        Ok(join(
            (0..k)
                .map(|i| if i == missing { rebuilt } else { slots[i] })
                .map(|s| s.expect("complete")),
            chunk_len,
        ))
    }
}

/// k data shards plus M - k Reed-Solomon parity shards.
pub struct ReedSolomonCodec {
    params: CodeParams,
}

impl ReedSolomonCodec {
    /// Works for any valid parameters, single parity included (for comparison with XOR).
    pub fn new(params: CodeParams) -> Self {
        Self { params }
    }
}

impl ErasureCodec for ReedSolomonCodec {
    fn params(&self) -> CodeParams {
        self.params
    }

    fn encode(&self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
        let mut shards = data_shards(self.params, chunk);
        let parity = reed_solomon_simd::encode(self.params.data(), self.params.parity(), &shards)
            .map_err(|e| ErasureError::ReedSolomon(e.to_string()))?;
        shards.extend(parity);
        Ok(shards)
    }

    fn decode(&self, chunk_len: usize, shards: &[(usize, &[u8])]) -> Result<Vec<u8>, ErasureError> {
        let slots = distinct(self.params, chunk_len, shards)?;
        let k = self.params.data();
        if slots[..k].iter().all(Option::is_some) {
            return Ok(join(slots[..k].iter().flatten(), chunk_len));
        }
        let originals = slots[..k]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)));
        let recovery = slots[k..]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)));
        let restored = reed_solomon_simd::decode(k, self.params.parity(), originals, recovery)
            .map_err(|e| ErasureError::ReedSolomon(e.to_string()))?;
        Ok(join(
            (0..k).map(|i| {
                slots[i].unwrap_or_else(|| {
                    restored
                        .get(&i)
                        .map(Vec::as_slice)
                        .expect("decoder restores every missing original")
                })
            }),
            chunk_len,
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn chunk(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn params_are_validated() {
        assert!(CodeParams::new(4, 5).is_ok());
        assert!(CodeParams::new(0, 5).is_err());
        assert!(CodeParams::new(4, 4).is_err());
        assert!(CodeParams::new(60, 65).is_err());
        assert_eq!(CodeParams::default().codec(), CodecKind::Xor);
        assert_eq!(
            CodeParams::new(8, 10).unwrap().codec(),
            CodecKind::ReedSolomon
        );
    }

    #[test]
    fn shard_length_covers_the_chunk() {
        let p = CodeParams::default();
        assert_eq!(p.shard_len(512 * 1024), 128 * 1024);
        assert_eq!(p.shard_len(1), 64);
        assert_eq!(p.shard_len(0), 64);
        assert!(p.shard_len(1000) * 4 >= 1000);
    }

    #[test]
    fn data_shards_alone_need_no_parity() {
        let codec = codec_for(CodeParams::default());
        let data = chunk(512 * 1024, 1);
        let shards = codec.encode(&data).unwrap();
        let first_k: Vec<(usize, &[u8])> = shards
            .iter()
            .take(4)
            .enumerate()
            .map(|(i, s)| (i, s.as_slice()))
            .collect();
        assert_eq!(codec.decode(data.len(), &first_k).unwrap(), data);
    }

    #[test]
    fn too_few_or_malformed_shards_are_errors() {
        let codec = codec_for(CodeParams::new(3, 5).unwrap());
        let data = chunk(1000, 2);
        let shards = codec.encode(&data).unwrap();
        let two: Vec<(usize, &[u8])> = vec![(0, &shards[0]), (0, &shards[0]), (4, &shards[4])];
        assert_eq!(
            codec.decode(1000, &two),
            Err(ErasureError::TooFewShards { have: 2, need: 3 })
        );
        let short: Vec<(usize, &[u8])> = vec![(0, &shards[0][1..])];
        assert!(matches!(
            codec.decode(1000, &short),
            Err(ErasureError::ShardLength { .. })
        ));
        let out: Vec<(usize, &[u8])> = vec![(9, &shards[0])];
        assert!(matches!(
            codec.decode(1000, &out),
            Err(ErasureError::ShardIndex { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Any k of the M shards rebuild the chunk, for k <= 16, M - k <= 4 and lengths
        /// from empty to more than a full chunk.
        #[test]
        fn any_k_of_m_rebuild(
            k in 1usize..=16,
            parity in 1usize..=4,
            len in 0usize..600_000,
            seed in any::<u8>(),
            picks in proptest::collection::vec(any::<u64>(), 20),
        ) {
            let params = CodeParams::new(k, k + parity).unwrap();
            let codec = codec_for(params);
            let data = chunk(len, seed);
            let shards = codec.encode(&data).unwrap();
            prop_assert_eq!(shards.len(), k + parity);
            // A random k-subset: shuffle the indices with the random picks.
            let mut order: Vec<usize> = (0..k + parity).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (picks[i % picks.len()] % (i as u64 + 1)) as usize);
            }
            let chosen: Vec<(usize, &[u8])> = order[..k].iter().map(|&i| (i, shards[i].as_slice())).collect();
            prop_assert_eq!(codec.decode(len, &chosen).unwrap(), data);
        }
    }
}
