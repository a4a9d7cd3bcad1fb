//! The frame around every stored shard, so that a shard is self-describing and verifiable
//! on its own: which code made it, its index, the chunk's length, and a crc32 over the
//! header and the payload.
//!
//! ```text
//! 0      4    5      6  7  8      9        12          16            20      24
//! | SLSH | v1 | codec| k| M| index| name tag| chunk len | payload len | crc32 | payload...
//! ```
//! Integers are little endian. The crc covers bytes 0..20 and the payload. The codec byte
//! is a `CodecKind`: 0 XOR (single parity), 1 Reed-Solomon over GF(2^16) (codes with more
//! parity written before kind 2 existed), 2 Cauchy Reed-Solomon over GF(2^8).
//!
//! The name tag is the first three bytes of the chunk's name, so that a shard whose frame is
//! valid but which belongs to another chunk (a node that mixed up keys, a stray write) is
//! recognised on its own, before it can spoil a decode. The bytes were "reserved, zero" in
//! the first frames; parsers have always ignored them and the crc has always covered them,
//! so readers that predate the tag read tagged frames unchanged and the version stays 1: a
//! version bump would make those readers refuse every new shard and rewrite it in the old
//! format during a rollout. A tag of zero means "untagged" (frames written before tags,
//! and one name in 2^24 whose first bytes are zero), which the check lets through. Three
//! bytes let a foreign shard through once in 2^24; the rebuilt chunk is still checked
//! against its name, so such a shard costs a fall back to the origin, never wrong bytes.

use crate::{
    chunk::ChunkName,
    erasure::{CodeParams, CodecKind},
};

pub const FRAME_MAGIC: [u8; 4] = *b"SLSH";
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 24;
/// Bytes of the chunk's name carried in the frame (the three bytes the first frames
/// reserved).
pub const NAME_TAG_LEN: usize = 3;
/// The tag of frames written before tags existed.
pub const UNTAGGED: [u8; NAME_TAG_LEN] = [0; NAME_TAG_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub params: CodeParams,
    /// The codec that made the shard; a reader decodes with
    /// `erasure::codec_with_kind(params, codec)`. New shards use `params.codec()`.
    pub codec: CodecKind,
    pub index: u8,
    pub chunk_len: u32,
    /// The first bytes of the chunk's name, or [`UNTAGGED`].
    pub name_tag: [u8; NAME_TAG_LEN],
}

impl ShardHeader {
    /// The header of a new shard of the chunk `name`, with the code's current codec.
    pub fn new(name: &ChunkName, params: CodeParams, index: u8, chunk_len: u32) -> Self {
        Self {
            params,
            codec: params.codec(),
            index,
            chunk_len,
            name_tag: name_tag(name),
        }
    }

    /// Whether the frame may belong to the chunk `name`: its tag is the name's, or it has
    /// none (see the module documentation).
    pub fn may_belong_to(&self, name: &ChunkName) -> bool {
        self.name_tag == UNTAGGED || self.name_tag == name_tag(name)
    }
}

/// The tag frames of the chunk `name` carry.
pub fn name_tag(name: &ChunkName) -> [u8; NAME_TAG_LEN] {
    let mut tag = [0; NAME_TAG_LEN];
    tag.copy_from_slice(&name.as_bytes()[..NAME_TAG_LEN]);
    tag
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("shorter than a shard header")]
    Truncated,
    #[error("not a slapshot shard")]
    BadMagic,
    #[error("shard frame version {0} is not supported")]
    Version(u8),
    #[error("the header describes an impossible code or index")]
    BadHeader,
    #[error("payload is {got} bytes, the header says {expected}")]
    Length { got: usize, expected: usize },
    #[error("crc32 mismatch")]
    Checksum,
    #[error("a data shard has bytes past the chunk's end (its padding must be zeros)")]
    Padding,
}

/// Frames a shard payload.
pub fn frame(header: &ShardHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.push(FRAME_VERSION);
    out.push(header.codec as u8);
    out.push(header.params.data);
    out.push(header.params.total);
    out.push(header.index);
    out.extend_from_slice(&header.name_tag);
    out.extend_from_slice(&header.chunk_len.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a framed shard and splits it into its header and payload.
pub fn parse(bytes: &[u8]) -> Result<(ShardHeader, &[u8]), FrameError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    if bytes[0..4] != FRAME_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != FRAME_VERSION {
        return Err(FrameError::Version(bytes[4]));
    }
    let params = CodeParams::new(usize::from(bytes[6]), usize::from(bytes[7]))
        .map_err(|_| FrameError::BadHeader)?;
    let codec = CodecKind::from_byte(bytes[5]).ok_or(FrameError::BadHeader)?;
    let index = bytes[8];
    let name_tag = bytes[9..12].try_into().expect("3 bytes");
    if !codec.fits(params) || usize::from(index) >= params.total() {
        return Err(FrameError::BadHeader);
    }
    let chunk_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let payload_len = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[FRAME_HEADER_LEN..];
    if payload.len() != payload_len {
        return Err(FrameError::Length {
            got: payload.len(),
            expected: payload_len,
        });
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..20]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err(FrameError::Checksum);
    }
    let expected = params.shard_len(chunk_len as usize);
    if payload_len != expected {
        return Err(FrameError::Length {
            got: payload_len,
            expected,
        });
    }
    // A data shard carries its slice of the chunk padded with zeros. The padding is cut
    // off when the data shards are read, so a shard with anything else there would pass
    // every read that uses it, yet break each rebuild from parity that relies on it (and
    // of a short chunk, whole data shards are padding). Checked here, it is a bad shard
    // like any other: named, read around and repaired.
    if usize::from(index) < usize::from(params.data) {
        let starts_at = usize::from(index) * expected;
        let chunk_bytes = (chunk_len as usize).saturating_sub(starts_at).min(expected);
        if payload[chunk_bytes..].iter().any(|&b| b != 0) {
            return Err(FrameError::Padding);
        }
    }
    Ok((
        ShardHeader {
            params,
            codec,
            index,
            chunk_len,
            name_tag,
        },
        payload,
    ))
}

#[cfg(test)]
mod tests {
    use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};

    use super::*;

    fn name() -> ChunkName {
        ChunkName::of(b"a chunk")
    }

    fn sample() -> (ShardHeader, Vec<u8>) {
        let params = CodeParams::default();
        (
            ShardHeader::new(&name(), params, 2, 1000),
            vec![9u8; params.shard_len(1000)],
        )
    }

    #[test]
    fn round_trips() {
        let (header, payload) = sample();
        let framed = frame(&header, &payload);
        assert_eq!(parse(&framed), Ok((header, payload.as_slice())));
    }

    #[test]
    fn the_codec_kind_round_trips_and_must_fit_the_code() {
        let params = CodeParams::new(8, 10).unwrap();
        let payload = vec![3u8; params.shard_len(5000)];
        let new = ShardHeader::new(&name(), params, 9, 5000);
        assert_eq!(new.codec, CodecKind::Gf256);
        // Shards written before the GF(2^8) codec say ReedSolomon, and still parse.
        let old = ShardHeader {
            codec: CodecKind::ReedSolomon,
            ..new
        };
        for header in [new, old] {
            let framed = frame(&header, &payload);
            assert_eq!(framed[5], header.codec as u8);
            assert_eq!(parse(&framed).map(|(h, _)| h), Ok(header));
        }
        // XOR cannot make an 8-of-10 code, nor Reed-Solomon a single-parity one.
        let xor = ShardHeader {
            codec: CodecKind::Xor,
            ..new
        };
        assert_eq!(parse(&frame(&xor, &payload)), Err(FrameError::BadHeader));
        let (single, single_payload) = sample();
        for codec in [CodecKind::ReedSolomon, CodecKind::Gf256] {
            let header = ShardHeader { codec, ..single };
            assert_eq!(
                parse(&frame(&header, &single_payload)),
                Err(FrameError::BadHeader)
            );
        }
    }

    #[test]
    fn the_name_tag_tells_a_foreign_shard_and_lets_untagged_ones_through() {
        let (header, payload) = sample();
        let framed = frame(&header, &payload);
        // The tag sits in the three bytes the first frames reserved, under the crc.
        assert_eq!(&framed[9..12], &name().as_bytes()[..3]);
        let (parsed, _) = parse(&framed).unwrap();
        assert!(parsed.may_belong_to(&name()));
        assert!(!parsed.may_belong_to(&ChunkName::of(b"another chunk")));
        // A frame written before tags (zeros there) is byte for byte what the old writer
        // made; it parses, and may belong to any chunk: the rebuilt bytes decide.
        let old = ShardHeader {
            name_tag: UNTAGGED,
            ..header
        };
        let old_frame = frame(&old, &payload);
        assert_eq!(&old_frame[9..12], &[0, 0, 0]);
        let (parsed, _) = parse(&old_frame).unwrap();
        assert!(parsed.may_belong_to(&name()) && parsed.may_belong_to(&ChunkName::of(b"x")));
        // A reader that predates the tag ignores those bytes: the rest of the header and the
        // crc are where it looks, and they are the same in both frames but for the tag.
        assert_eq!(framed[..9], old_frame[..9]);
        assert_eq!(framed[12..20], old_frame[12..20]);
    }

    #[test]
    fn a_data_shard_with_anything_but_zeros_past_the_chunk_is_refused() {
        let params = CodeParams::default();
        let k = usize::from(params.data);
        // A 100-byte chunk: the first data shards hold it, the last ones are padding only.
        let chunk_len = 100;
        let len = params.shard_len(chunk_len);
        assert!(len * k > chunk_len + len, "some data shard is padding only");
        for index in 0..params.total() {
            let real = chunk_len.saturating_sub(index * len).min(len);
            if index < k && real == len {
                continue; // no padding to test
            }
            let mut payload = vec![0u8; len];
            if index < k {
                payload[..real].fill(7);
            }
            let header = ShardHeader::new(&name(), params, index as u8, chunk_len as u32);
            assert!(parse(&frame(&header, &payload)).is_ok(), "shard {index}");
            // One byte past the chunk's end, with a crc that covers it.
            payload[len - 1] = 1;
            let framed = frame(&header, &payload);
            let result = parse(&framed);
            if index < k {
                assert_eq!(result, Err(FrameError::Padding), "shard {index}");
            } else {
                assert!(
                    result.is_ok(),
                    "parity shard {index} has no padding of its own"
                );
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let (header, payload) = sample();
        let framed = frame(&header, &payload);
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x10;
            assert!(parse(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    /// Header fields as a hostile or broken node might send them, with a crc that is right
    /// most of the time: random bytes alone stop at the magic (4 bytes to guess) and, past
    /// it, at the crc, so they would never exercise the checks behind them.
    fn raw_frames() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![9 => Just(FRAME_MAGIC), 1 => any::<[u8; 4]>()],
            prop_oneof![9 => Just(FRAME_VERSION), 1 => any::<u8>()],
            prop_oneof![9 => 0u8..3, 1 => any::<u8>()],
            0u8..8,
            0u8..10,
            0u8..10,
            any::<[u8; NAME_TAG_LEN]>(),
            0u32..3000,
            // 0: a payload of another length; 1: the code's length, data shards padded
            // with zeros; 2: the code's length, padding not zeroed.
            prop_oneof![1 => Just(0u8), 2 => Just(1), 2 => Just(2)],
            prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)],
            prop_oneof![4 => Just(None), 1 => (0usize..64, 1u8..=255).prop_map(Some)],
            0usize..40,
        )
            .prop_map(
                |(magic, version, codec, k, m, index, tag, chunk_len, fit, bad_crc, flip, cut)| {
                    // Most payloads have the length the header's code implies, so that
                    // frames get through every check and the accepted ones are checked too.
                    let (payload_len, padding_from) =
                        match CodeParams::new(usize::from(k), usize::from(m)) {
                            Ok(params) if fit > 0 => {
                                let len = params.shard_len(chunk_len as usize);
                                let start = usize::from(index) * len;
                                let real = (chunk_len as usize).saturating_sub(start).min(len);
                                let zeroed = fit == 1 && index < params.data;
                                (len, if zeroed { real } else { len })
                            }
                            _ => ((chunk_len as usize * 7) % 700, usize::MAX),
                        };
                    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload_len);
                    out.extend_from_slice(&magic);
                    out.extend_from_slice(&[version, codec, k, m, index]);
                    out.extend_from_slice(&tag);
                    out.extend_from_slice(&chunk_len.to_le_bytes());
                    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
                    let payload: Vec<u8> = (0..payload_len)
                        .map(|i| if i >= padding_from { 0 } else { (i * 31) as u8 })
                        .collect();
                    let mut crc = crc32fast::Hasher::new();
                    crc.update(&out);
                    crc.update(&payload);
                    let crc = bad_crc.unwrap_or_else(|| crc.finalize());
                    out.extend_from_slice(&crc.to_le_bytes());
                    out.extend_from_slice(&payload);
                    if let Some((at, bits)) = flip {
                        let at = at % out.len();
                        out[at] ^= bits;
                    }
                    // Now and then a frame cut short, down to a few bytes.
                    if cut < 4 {
                        out.truncate(out.len() * cut / 4);
                    }
                    out
                },
            )
    }

    proptest::proptest! {
        /// Bytes from the network never make the parser panic, and whatever it accepts is
        /// self-consistent.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop_oneof![
            raw_frames(),
            proptest::collection::vec(any::<u8>(), 0..512),
        ]) {
            if let Ok((header, payload)) = parse(&bytes) {
                prop_assert_eq!(payload.len(), header.params.shard_len(header.chunk_len as usize));
                if header.index < header.params.data {
                    let start = usize::from(header.index) * payload.len();
                    let real = (header.chunk_len as usize).saturating_sub(start).min(payload.len());
                    prop_assert!(payload[real..].iter().all(|&b| b == 0), "padding accepted");
                }
                prop_assert!(header.codec.fits(header.params));
                prop_assert!(usize::from(header.index) < header.params.total());
                prop_assert_eq!(frame(&header, payload), bytes);
            }
        }

        /// Frames that start valid and are then damaged anywhere are rejected.
        #[test]
        fn damaged_frames_are_rejected(index in 0usize..100, flip in 1u8..=255) {
            let (header, payload) = sample();
            let mut framed = frame(&header, &payload);
            let at = index % framed.len();
            framed[at] ^= flip;
            proptest::prop_assert!(parse(&framed).is_err());
        }
    }

    /// The property above is only worth something if its inputs get past the first checks:
    /// this draws from the same generator and requires every outcome of the parser.
    #[test]
    fn the_property_inputs_reach_every_check() {
        let mut runner = TestRunner::deterministic();
        let strategy = raw_frames();
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..4000 {
            let bytes = strategy.new_tree(&mut runner).unwrap().current();
            let outcome = match parse(&bytes) {
                Ok(_) => "accepted",
                Err(FrameError::Truncated) => "truncated",
                Err(FrameError::BadMagic) => "magic",
                Err(FrameError::Version(_)) => "version",
                Err(FrameError::BadHeader) => "header",
                Err(FrameError::Length { .. }) => "length",
                Err(FrameError::Checksum) => "checksum",
                Err(FrameError::Padding) => "padding",
            };
            *seen.entry(outcome).or_insert(0u32) += 1;
        }
        for outcome in [
            "accepted",
            "truncated",
            "magic",
            "version",
            "header",
            "length",
            "checksum",
            "padding",
        ] {
            let count = seen.get(outcome).copied().unwrap_or(0);
            // Dirty padding needs a valid code, a data shard and a chunk short of it: rarer.
            let least = if outcome == "padding" { 10 } else { 40 };
            assert!(count >= least, "{outcome}: {count} of 4000 ({seen:?})");
        }
    }

    #[test]
    fn truncation_and_foreign_bytes_are_rejected() {
        let (header, payload) = sample();
        let framed = frame(&header, &payload);
        assert_eq!(parse(&framed[..10]), Err(FrameError::Truncated));
        assert!(matches!(
            parse(&framed[..framed.len() - 1]),
            Err(FrameError::Length { .. })
        ));
        assert_eq!(parse(&[0u8; 64]), Err(FrameError::BadMagic));
    }
}
