//! Erasure coding of chunks into shards.
//!
//! A chunk is cut into k data shards (the last padded with zeros) and M - k parity shards;
//! any k of the M rebuild it. When M - k = 1 the parity is the XOR of the data shards (the
//! paper's production 4-of-5 code); otherwise a systematic Cauchy Reed-Solomon code over
//! GF(2^8) of our own ([`Gf256Codec`], SIMD kernels chosen at run time). Reading the k
//! data shards needs no decoding at all: they are the chunk, cut in pieces.
//!
//! Shards written before the GF(2^8) codec used Reed-Solomon over GF(2^16) from
//! reed-solomon-simd ([`ReedSolomonCodec`]); every shard frame records its [`CodecKind`],
//! and [`codec_with_kind`] gives the codec that reads it.

mod field;
mod gf256;
mod kernels;

use bytes::Bytes;

pub use gf256::Gf256Codec;
pub use kernels::Kernel;

/// Shards are padded to a multiple of this many bytes: reed-solomon-simd needs an even
/// length and runs fastest on 64-byte multiples, XOR vectorises over them, and the
/// GF(2^8) kernels then run whole 512-bit vectors with no scalar tail.
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
    #[error("codec {kind:?} cannot make a {data}-of-{total} code")]
    KindMismatch {
        kind: CodecKind,
        data: usize,
        total: usize,
    },
}

/// k-of-M: `data` shards carry the chunk, `total - data` carry parity. Made only by `new`,
/// which checks them (k at least 1, k < M <= 64): nothing outside this crate can build one
/// that divides by zero or overflows a shard mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeParams {
    pub(crate) data: u8,
    pub(crate) total: u8,
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

    /// The codec new shards of this code are written with: XOR for single parity, the
    /// GF(2^8) Cauchy code otherwise.
    pub fn codec(&self) -> CodecKind {
        if self.parity() == 1 {
            CodecKind::Xor
        } else {
            CodecKind::Gf256
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

/// Which parity computation a shard was made with; recorded in every shard frame (the
/// discriminant is the frame's byte, so values are never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodecKind {
    /// One XOR parity shard ([`XorCodec`]).
    Xor = 0,
    /// Reed-Solomon over GF(2^16) from reed-solomon-simd ([`ReedSolomonCodec`]): what
    /// codes with two or more parity shards were written with before `Gf256`.
    ReedSolomon = 1,
    /// Systematic Cauchy Reed-Solomon over GF(2^8) ([`Gf256Codec`]).
    Gf256 = 2,
}

impl CodecKind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Xor),
            1 => Some(Self::ReedSolomon),
            2 => Some(Self::Gf256),
            _ => None,
        }
    }

    /// Whether shards of this kind can belong to a code with `params`: XOR exactly for
    /// single parity, either Reed-Solomon for two or more (what writers have produced).
    pub fn fits(self, params: CodeParams) -> bool {
        match self {
            Self::Xor => params.parity() == 1,
            Self::ReedSolomon | Self::Gf256 => params.parity() >= 2,
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

    /// Like `decode`, but the chunk comes back as its k data shards in order (cut to
    /// `chunk_len`, no part empty), sharing the buffers it was given: with every data shard present
    /// nothing is copied, and a codec that can (`rebuild_in_parts`) rebuilds only the
    /// missing ones. The rest fall back to one buffer from `decode`.
    fn decode_parts(
        &self,
        chunk_len: usize,
        shards: &[(usize, Bytes)],
    ) -> Result<Vec<Bytes>, ErasureError> {
        let slots = distinct(self.params(), chunk_len, shards)?;
        let mut data = slots[..self.params().data()].to_vec();
        if data.iter().any(Option::is_none) {
            let views: Vec<Option<&[u8]>> = slots.iter().map(|s| s.as_deref()).collect();
            if !self.rebuild_in_parts(&views, &mut data) {
                let refs: Vec<(usize, &[u8])> =
                    shards.iter().map(|(i, b)| (*i, b.as_ref())).collect();
                let whole = Bytes::from(self.decode(chunk_len, &refs)?);
                return Ok(if whole.is_empty() {
                    vec![]
                } else {
                    vec![whole]
                });
            }
        }
        Ok(cut_to_chunk(data, chunk_len))
    }

    /// Fills the missing data shards of `data` (k entries) from `slots` (the first copy of
    /// every index, checked, at least k of them), each in a buffer of its own; false if
    /// this codec rebuilds only into one buffer, with `decode`.
    fn rebuild_in_parts(&self, _slots: &[Option<&[u8]>], _data: &mut [Option<Bytes>]) -> bool {
        false
    }
}

/// The complete data shards as the chunk's parts: the padding past `chunk_len` cut off.
fn cut_to_chunk(data: Vec<Option<Bytes>>, chunk_len: usize) -> Vec<Bytes> {
    let mut left = chunk_len;
    let mut parts = Vec::with_capacity(data.len());
    for shard in data {
        let shard = shard.expect("every data shard present");
        let take = shard.len().min(left);
        if take > 0 {
            parts.push(shard.slice(..take));
        }
        left -= take;
    }
    parts
}

/// The codec new shards of `params` are written with ([`CodeParams::codec`]): XOR for
/// single parity, the GF(2^8) Cauchy code otherwise.
pub fn codec_for(params: CodeParams) -> Box<dyn ErasureCodec> {
    codec_with_kind(params, params.codec()).expect("a code's own kind fits it")
}

/// The codec that reads shards framed with `params` and `kind` (shards written by older
/// versions name `CodecKind::ReedSolomon`), or an error if the kind cannot make that code.
pub fn codec_with_kind(
    params: CodeParams,
    kind: CodecKind,
) -> Result<Box<dyn ErasureCodec>, ErasureError> {
    if !kind.fits(params) {
        return Err(ErasureError::KindMismatch {
            kind,
            data: params.data(),
            total: params.total(),
        });
    }
    Ok(match kind {
        CodecKind::Xor => Box::new(XorCodec::new(params)),
        CodecKind::ReedSolomon => Box::new(ReedSolomonCodec::new(params)),
        CodecKind::Gf256 => Box::new(Gf256Codec::new(params)),
    })
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
fn distinct<T: AsRef<[u8]> + Clone>(
    params: CodeParams,
    chunk_len: usize,
    shards: &[(usize, T)],
) -> Result<Vec<Option<T>>, ErasureError> {
    let expected = params.shard_len(chunk_len);
    let mut slots = vec![None; params.total()];
    for (index, bytes) in shards {
        let (index, bytes) = (*index, bytes.clone());
        if index >= params.total() {
            return Err(ErasureError::ShardIndex {
                index,
                total: params.total(),
            });
        }
        let len = bytes.as_ref().len();
        if len != expected {
            return Err(ErasureError::ShardLength {
                index,
                len,
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
    // Only the chunk's bytes are copied, not the padding after them: k shards can exceed
    // the chunk by up to k x 63 bytes, and a buffer sized for the chunk would then be
    // reallocated (and the chunk copied again) by the last shard.
    let mut chunk = Vec::with_capacity(chunk_len);
    for shard in data {
        let shard = shard.as_ref();
        let take = shard.len().min(chunk_len - chunk.len());
        chunk.extend_from_slice(&shard[..take]);
    }
    chunk
}

/// Appends the XOR of `srcs` (of equal lengths, multiples of 64) to `out`, in one pass
/// over 64-byte blocks: each block is written once whatever the number of sources (no copy
/// of the first source to XOR the others into, no pass per source), and the block loop
/// vectorises.
fn extend_with_xor(out: &mut Vec<u8>, srcs: &[&[u8]]) {
    let len = srcs[0].len();
    debug_assert!(srcs.iter().all(|s| s.len() == len) && len.is_multiple_of(SHARD_ALIGN));
    out.reserve(len);
    for at in (0..len).step_by(SHARD_ALIGN) {
        let mut block = [0u8; SHARD_ALIGN];
        for src in srcs {
            for (x, y) in block.iter_mut().zip(&src[at..at + SHARD_ALIGN]) {
                *x ^= y;
            }
        }
        out.extend_from_slice(&block);
    }
}

/// What rebuilds the one missing data shard of a XOR code: the parity shard and the other
/// data shards, to XOR together.
fn rebuild_sources<'a>(slots: &[Option<&'a [u8]>], k: usize, missing: usize) -> Vec<&'a [u8]> {
    let mut sources = vec![slots[k].expect("parity present when a data shard is missing")];
    sources.extend(
        (0..k)
            .filter(|&i| i != missing)
            .map(|i| slots[i].expect("all other data shards present")),
    );
    sources
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
        let mut parity = Vec::new();
        let data: Vec<&[u8]> = shards.iter().map(Vec::as_slice).collect();
        extend_with_xor(&mut parity, &data);
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
        // parity XOR every other data shard, rebuilt where it belongs in the chunk (no
        // temporary shard, no second copy by a join).
        let sources = rebuild_sources(&slots, k, missing);
        let mut chunk = Vec::with_capacity(k * sources[0].len());
        for (i, slot) in slots[..k].iter().enumerate() {
            if i == missing {
                extend_with_xor(&mut chunk, &sources);
            } else {
                chunk.extend_from_slice(slot.expect("all other data shards present"));
            }
        }
        chunk.truncate(chunk_len);
        Ok(chunk)
    }

    fn rebuild_in_parts(&self, slots: &[Option<&[u8]>], data: &mut [Option<Bytes>]) -> bool {
        let k = self.params.data();
        if let Some(missing) = slots[..k].iter().position(Option::is_none) {
            // The one missing data shard is the parity XOR the others, in a buffer of its
            // own; the others stay where they are.
            let mut rebuilt = Vec::new();
            extend_with_xor(&mut rebuilt, &rebuild_sources(slots, k, missing));
            data[missing] = Some(Bytes::from(rebuilt));
        }
        true
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

    /// Bytes without the period of `chunk`: Marsaglia's xorshift64 (shifts 13, 7, 17), the
    /// seed spread by 2^64 / golden ratio (Fibonacci hashing) so small seeds differ widely.
    fn random_chunk(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    /// Every k-subset of 0..total, in lexicographic order.
    fn subsets(k: usize, total: usize) -> Vec<Vec<usize>> {
        let mut all = Vec::new();
        let mut pick: Vec<usize> = (0..k).collect();
        loop {
            all.push(pick.clone());
            // The rightmost index that can still move right, then reset those after it.
            let Some(i) = (0..k).rev().find(|&i| pick[i] < total - k + i) else {
                return all;
            };
            pick[i] += 1;
            for j in i + 1..k {
                pick[j] = pick[j - 1] + 1;
            }
        }
    }

    #[test]
    fn params_are_validated() {
        assert!(CodeParams::new(4, 5).is_ok());
        assert!(CodeParams::new(0, 5).is_err());
        assert!(CodeParams::new(4, 4).is_err());
        assert!(CodeParams::new(60, 65).is_err());
        assert_eq!(CodeParams::default().codec(), CodecKind::Xor);
        assert_eq!(CodeParams::new(8, 10).unwrap().codec(), CodecKind::Gf256);
        assert_eq!(CodeParams::new(1, 3).unwrap().codec(), CodecKind::Gf256);
    }

    #[test]
    fn kinds_round_trip_through_their_byte() {
        for kind in [CodecKind::Xor, CodecKind::ReedSolomon, CodecKind::Gf256] {
            assert_eq!(CodecKind::from_byte(kind as u8), Some(kind));
        }
        assert_eq!(CodecKind::from_byte(3), None);
    }

    #[test]
    fn old_reed_solomon_shards_still_decode_by_their_kind() {
        let params = CodeParams::new(4, 6).unwrap();
        let data = random_chunk(300_001, 4);
        let old = ReedSolomonCodec::new(params).encode(&data).unwrap();
        let reader = codec_with_kind(params, CodecKind::ReedSolomon).unwrap();
        let degraded: Vec<(usize, &[u8])> = (2..6).map(|i| (i, old[i].as_slice())).collect();
        assert_eq!(reader.decode(data.len(), &degraded).unwrap(), data);
        // The same shards read as the new kind are other bytes, not a panic: the kind in
        // the frame matters, and the reader's name check is what catches a mix-up.
        let wrong = codec_for(params);
        assert_ne!(wrong.decode(data.len(), &degraded).unwrap(), data);
    }

    #[test]
    fn a_kind_that_cannot_make_the_code_is_an_error() {
        let single = CodeParams::new(4, 5).unwrap();
        let double = CodeParams::new(4, 6).unwrap();
        assert!(codec_with_kind(single, CodecKind::Xor).is_ok());
        assert!(codec_with_kind(double, CodecKind::Gf256).is_ok());
        assert!(codec_with_kind(double, CodecKind::ReedSolomon).is_ok());
        assert!(matches!(
            codec_with_kind(double, CodecKind::Xor),
            Err(ErasureError::KindMismatch { .. })
        ));
        assert!(matches!(
            codec_with_kind(single, CodecKind::Gf256),
            Err(ErasureError::KindMismatch { .. })
        ));
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

    /// `decode_parts` is `decode` without the copy: the same bytes (or the same error) for
    /// every codec kind, at lengths of none, part of one shard and a few shards, with
    /// shards lost, and with a second copy of an index (the first is the one used, whether
    /// it is the true one or not).
    #[test]
    fn decode_parts_is_decode_in_parts() {
        for (k, total) in [(4, 5), (4, 6), (1, 2), (3, 5), (10, 11)] {
            let params = CodeParams::new(k, total).unwrap();
            let codec = codec_for(params);
            for len in [0usize, 1, 63, 200, 1000, 4096, 70_001] {
                // Random bytes: a pattern with a short period would hide blocks XORed or
                // copied from the wrong offset.
                let data = random_chunk(len, (k * 1000 + len) as u64);
                let shards: Vec<Bytes> = codec
                    .encode(&data)
                    .unwrap()
                    .into_iter()
                    .map(Bytes::from)
                    .collect();
                if total == k + 1 {
                    // Known answer: XOR parity is the bytewise XOR of the data shards.
                    let mut parity = vec![0u8; shards[0].len()];
                    for shard in &shards[..k] {
                        for (p, b) in parity.iter_mut().zip(shard.iter()) {
                            *p ^= b;
                        }
                    }
                    assert_eq!(&shards[k][..], &parity[..], "{k}-of-{total}, {len} bytes");
                }
                let mut damaged = shards[0].to_vec();
                damaged[0] ^= 1;
                let damaged = Bytes::from(damaged);
                let all: Vec<(usize, Bytes)> = shards.iter().cloned().enumerate().collect();
                let last_k: Vec<(usize, Bytes)> = all[total - k..].to_vec();
                let mut true_first = all.clone();
                true_first.insert(1, (0, damaged.clone()));
                let mut damaged_first = all.clone();
                damaged_first.insert(0, (0, damaged.clone()));
                let too_few: Vec<(usize, Bytes)> = all[..k - 1].to_vec();
                for (case, given) in [
                    ("all", all),
                    ("the last k", last_k),
                    ("the true copy first", true_first),
                    ("a damaged copy first", damaged_first),
                    ("k - 1", too_few),
                ] {
                    let refs: Vec<(usize, &[u8])> =
                        given.iter().map(|(i, b)| (*i, b.as_ref())).collect();
                    let whole = codec.decode(len, &refs);
                    let parts = codec.decode_parts(len, &given);
                    if let Ok(parts) = &parts {
                        assert!(parts.iter().all(|p| !p.is_empty()), "no empty part");
                    }
                    let parts = parts.map(|p| p.concat());
                    assert_eq!(parts, whole, "{k}-of-{total}, {len} bytes, {case}");
                    if case != "a damaged copy first" && case != "k - 1" {
                        assert_eq!(parts.unwrap(), data, "{k}-of-{total}, {len} bytes, {case}");
                    }
                }
                // Malformed with every data shard there: the same errors as `decode`.
                let mut short = shards.iter().cloned().enumerate().collect::<Vec<_>>();
                short[0].1 = short[0].1.slice(1..);
                let mut outside = shards.iter().cloned().enumerate().collect::<Vec<_>>();
                outside.push((total, shards[0].clone()));
                for given in [short, outside] {
                    let refs: Vec<(usize, &[u8])> =
                        given.iter().map(|(i, b)| (*i, b.as_ref())).collect();
                    let error = codec.decode_parts(len, &given).unwrap_err();
                    assert_eq!(Err(error), codec.decode(len, &refs));
                }
            }
        }
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
            prop_assert_eq!(&codec.decode(len, &chosen).unwrap(), &data);
            // In parts: the same bytes, and every data shard given is shared, not copied.
            let owned: Vec<(usize, Bytes)> =
                chosen.iter().map(|&(i, b)| (i, Bytes::copy_from_slice(b))).collect();
            let parts = codec.decode_parts(len, &owned).unwrap();
            prop_assert_eq!(parts.concat(), data);
            let shard_len = params.shard_len(len);
            let rebuilt = owned.iter().any(|&(i, _)| i >= k);
            if !rebuilt || parity == 1 {
                for (i, given) in &owned {
                    if *i < k && i * shard_len < len {
                        prop_assert_eq!(parts[*i].as_ptr(), given.as_ptr());
                    }
                }
            }
        }

        /// For the codes we run, EVERY k-subset of the M GF(2^8) shards rebuilds the chunk,
        /// in any order, at lengths around every boundary: empty, one byte, around a shard
        /// alignment, around a 4 KiB stripe, and arbitrary odd lengths.
        #[test]
        fn gf256_every_k_subset_rebuilds(
            code in prop::sample::select(vec![(2usize, 4usize), (4, 6), (8, 10), (10, 14), (3, 7), (1, 3)]),
            len in prop_oneof![
                Just(0usize), Just(1), Just(63), Just(64), Just(65), Just(4097),
                (0usize..40_000).prop_map(|l| l | 1),
            ],
            seed in any::<u64>(),
        ) {
            let (k, total) = code;
            let codec = Gf256Codec::new(CodeParams::new(k, total).unwrap());
            let data = random_chunk(len, seed);
            let shards = codec.encode(&data).unwrap();
            prop_assert_eq!(shards.len(), total);
            let mut degraded = 0;
            for subset in subsets(k, total) {
                // Present them last first: decode takes shards in any order.
                let chosen: Vec<(usize, &[u8])> =
                    subset.iter().rev().map(|&i| (i, shards[i].as_slice())).collect();
                prop_assert_eq!(&codec.decode(len, &chosen).unwrap(), &data, "{:?}", subset);
                degraded += usize::from(subset.iter().any(|&i| i >= k));
            }
            // The loop reached the decoding path, not only the join of data shards.
            prop_assert_eq!(degraded, subsets(k, total).len() - 1);
        }

        /// Large codes, random subsets: up to 64 shards in all.
        #[test]
        fn gf256_large_codes_rebuild(
            k in 1usize..=40,
            parity in 2usize..=24,
            len in 0usize..20_000,
            seed in any::<u64>(),
        ) {
            let params = CodeParams::new(k, k + parity).unwrap();
            let codec = Gf256Codec::new(params);
            let data = random_chunk(len, seed);
            let shards = codec.encode(&data).unwrap();
            // Drop up to `parity` shards, data shards first (the hardest case), then a
            // pseudo-random rest.
            let mut order: Vec<usize> = (0..k + parity).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let chosen: Vec<(usize, &[u8])> =
                order[..k].iter().map(|&i| (i, shards[i].as_slice())).collect();
            prop_assert_eq!(&codec.decode(len, &chosen).unwrap(), &data);
            let last_k: Vec<(usize, &[u8])> =
                (parity..k + parity).map(|i| (i, shards[i].as_slice())).collect();
            prop_assert_eq!(&codec.decode(len, &last_k).unwrap(), &data);
        }

        /// Every kernel writes the same parity and rebuilds the same bytes.
        #[test]
        fn gf256_kernels_agree_on_shards(
            len in (0usize..70_000).prop_map(|l| l | 1),
            seed in any::<u64>(),
        ) {
            let params = CodeParams::new(10, 14).unwrap();
            let data = random_chunk(len, seed);
            let reference = Gf256Codec::with_kernel(params, Kernel::Scalar).encode(&data).unwrap();
            let degraded: Vec<(usize, &[u8])> =
                (4..14).map(|i| (i, reference[i].as_slice())).collect();
            for kernel in Kernel::available() {
                let codec = Gf256Codec::with_kernel(params, kernel);
                prop_assert_eq!(&codec.encode(&data).unwrap(), &reference, "{:?}", kernel);
                prop_assert_eq!(&codec.decode(len, &degraded).unwrap(), &data, "{:?}", kernel);
            }
        }
    }

    #[test]
    fn the_code_is_mds_for_small_codes() {
        // Every k-subset of every code with M <= 10 rebuilds: the Cauchy construction's
        // claim, checked rather than trusted. Short chunks keep this exhaustive.
        for total in 2..=10 {
            for k in 1..total {
                let codec = Gf256Codec::new(CodeParams::new(k, total).unwrap());
                let data = random_chunk(k * 64 + 5, (k * 100 + total) as u64);
                let shards = codec.encode(&data).unwrap();
                for subset in subsets(k, total) {
                    let chosen: Vec<(usize, &[u8])> =
                        subset.iter().map(|&i| (i, shards[i].as_slice())).collect();
                    assert_eq!(
                        codec.decode(data.len(), &chosen).unwrap(),
                        data,
                        "{k}-of-{total} {subset:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_corrupted_shard_gives_other_bytes() {
        // The decode really uses the parity: damage one byte of a parity shard and one
        // byte of the rebuilt data changes; damage a data shard and the join changes.
        let codec = Gf256Codec::new(CodeParams::new(8, 10).unwrap());
        let data = random_chunk(512 * 1024, 9);
        let mut shards = codec.encode(&data).unwrap();
        shards[9][1000] ^= 0x40;
        let degraded: Vec<(usize, &[u8])> = (2..10).map(|i| (i, shards[i].as_slice())).collect();
        let rebuilt = codec.decode(data.len(), &degraded).unwrap();
        assert_ne!(rebuilt, data);
        let differing = rebuilt.iter().zip(&data).filter(|(a, b)| a != b).count();
        // One damaged source byte reaches byte 1000 of each of the 2 rebuilt shards.
        assert_eq!(differing, 2);
        shards[3][7] ^= 1;
        let data_only: Vec<(usize, &[u8])> = (0..8).map(|i| (i, shards[i].as_slice())).collect();
        assert_ne!(codec.decode(data.len(), &data_only).unwrap(), data);
    }

    #[test]
    fn gf256_malformed_input_is_a_typed_error() {
        let params = CodeParams::new(4, 6).unwrap();
        let codec = Gf256Codec::new(params);
        let data = random_chunk(10_000, 3);
        let shards = codec.encode(&data).unwrap();
        let s = |i: usize| (i, shards[i].as_slice());
        assert_eq!(
            codec.decode(data.len(), &[s(0), s(5), s(5), s(0), s(4)]),
            Err(ErasureError::TooFewShards { have: 3, need: 4 })
        );
        assert_eq!(
            codec.decode(data.len(), &[]),
            Err(ErasureError::TooFewShards { have: 0, need: 4 })
        );
        assert!(matches!(
            codec.decode(data.len(), &[s(0), s(1), (2, &shards[2][..100]), s(4)]),
            Err(ErasureError::ShardLength { index: 2, .. })
        ));
        // A chunk length that implies another shard length is the same error.
        assert!(matches!(
            codec.decode(data.len() * 2, &[s(0), s(1), s(2), s(4)]),
            Err(ErasureError::ShardLength { .. })
        ));
        assert!(matches!(
            codec.decode(data.len(), &[s(0), s(1), s(2), (6, &shards[3])]),
            Err(ErasureError::ShardIndex { index: 6, total: 6 })
        ));
        assert!(matches!(
            codec.decode(data.len(), &[s(0), s(1), s(2), (usize::MAX, &shards[3])]),
            Err(ErasureError::ShardIndex { .. })
        ));
    }
}
