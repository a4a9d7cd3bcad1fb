//! The frame around every stored shard, so that a shard is self-describing and verifiable
//! on its own: which code made it, its index, the chunk's length, and a crc32 over the
//! header and the payload.
//!
//! ```text
//! 0      4    5      6  7  8      9        12          16            20      24
//! | SLSH | v1 | codec| k| M| index| reserved| chunk len | payload len | crc32 | payload...
//! ```
//! Integers are little endian. The crc covers bytes 0..20 and the payload. The codec byte
//! is a `CodecKind`: 0 XOR (single parity), 1 Reed-Solomon over GF(2^16) (codes with more
//! parity written before kind 2 existed), 2 Cauchy Reed-Solomon over GF(2^8).

use crate::erasure::{CodeParams, CodecKind};

pub const FRAME_MAGIC: [u8; 4] = *b"SLSH";
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub params: CodeParams,
    /// The codec that made the shard; a reader decodes with
    /// `erasure::codec_with_kind(params, codec)`. New shards use `params.codec()`.
    pub codec: CodecKind,
    pub index: u8,
    pub chunk_len: u32,
}

impl ShardHeader {
    /// The header of a new shard: the code's current codec.
    pub fn new(params: CodeParams, index: u8, chunk_len: u32) -> Self {
        Self {
            params,
            codec: params.codec(),
            index,
            chunk_len,
        }
    }
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
    out.extend_from_slice(&[0; 3]);
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
    Ok((
        ShardHeader {
            params,
            codec,
            index,
            chunk_len,
        },
        payload,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (ShardHeader, Vec<u8>) {
        let params = CodeParams::default();
        (
            ShardHeader::new(params, 2, 1000),
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
        let new = ShardHeader::new(params, 9, 5000);
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
    fn any_flipped_byte_is_detected() {
        let (header, payload) = sample();
        let framed = frame(&header, &payload);
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x10;
            assert!(parse(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    proptest::proptest! {
        /// Bytes from the network never make the parser panic, and whatever it accepts is
        /// self-consistent.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok((header, payload)) = parse(&bytes) {
                proptest::prop_assert_eq!(payload.len(), header.params.shard_len(header.chunk_len as usize));
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
