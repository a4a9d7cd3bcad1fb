//! Reading an image back: chunks opened against the manifest, files as extents.

use slapshot_core::chunk::open_in_place;

use crate::manifest::{Extent, InodeKind, Manifest, ZERO_CHUNK};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("chunk {index} ({name}): {len} bytes, the manifest says {expected}")]
    Length {
        index: u32,
        name: String,
        len: usize,
        expected: u32,
    },
    #[error("chunk {index} ({name}) does not match its name")]
    Corrupt { index: u32, name: String },
    #[error("inode {0} is not a regular file")]
    NotAFile(u32),
}

/// Verifies a chunk's stored bytes against the manifest and decrypts them in place.
pub fn open_chunk(
    manifest: &Manifest,
    index: u32,
    mut bytes: Vec<u8>,
) -> Result<Vec<u8>, ReadError> {
    let chunk = &manifest.chunks[index as usize];
    if bytes.len() != chunk.len as usize {
        return Err(ReadError::Length {
            index,
            name: chunk.name.to_hex(),
            len: bytes.len(),
            expected: chunk.len,
        });
    }
    open_in_place(&chunk.name, &manifest.keys[index as usize], &mut bytes).map_err(|_| {
        ReadError::Corrupt {
            index,
            name: chunk.name.to_hex(),
        }
    })?;
    Ok(bytes)
}

/// The extents of a regular file.
pub fn extents(manifest: &Manifest, ino: u32) -> Result<&[Extent], ReadError> {
    match &manifest.inodes.get(ino as usize).map(|i| &i.kind) {
        Some(InodeKind::File { extents, .. }) => Ok(extents),
        _ => Err(ReadError::NotAFile(ino)),
    }
}

/// The pieces of extents that cover `[offset, offset + len)` of a file: (extent, start
/// within the extent, length). Zero extents have `chunk == ZERO_CHUNK`.
pub fn covering(extents: &[Extent], offset: u64, len: u64) -> Vec<(Extent, u32, u32)> {
    let mut out = Vec::new();
    if len == 0 {
        return out;
    }
    let end = offset.saturating_add(len);
    let mut at = 0u64;
    for e in extents {
        let e_end = at + u64::from(e.len);
        if e_end > offset && at < end {
            let start = offset.max(at) - at;
            let stop = end.min(e_end) - at;
            out.push((*e, start as u32, (stop - start) as u32));
        }
        if e_end >= end {
            break;
        }
        at = e_end;
    }
    out
}

/// True for extents that read as zeros.
pub fn is_zero(extent: &Extent) -> bool {
    extent.chunk == ZERO_CHUNK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_ranges() {
        let e = |chunk, len| Extent {
            chunk,
            offset: 0,
            len,
        };
        let extents = [e(0, 10), e(1, 10), e(2, 5)];
        assert_eq!(covering(&extents, 0, 25).len(), 3);
        assert_eq!(
            covering(&extents, 5, 10),
            vec![(e(0, 10), 5, 5), (e(1, 10), 0, 5)]
        );
        assert_eq!(covering(&extents, 20, 100), vec![(e(2, 5), 0, 5)]);
        assert!(covering(&extents, 25, 10).is_empty());
        assert!(covering(&extents, 3, 0).is_empty());
    }
}
