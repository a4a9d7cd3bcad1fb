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

/// Symlinks followed before a path is declared a loop (Linux's MAXSYMLINKS).
pub(crate) const MAX_SYMLINKS: usize = 40;

/// The inode at `path`, following symlinks inside the image (absolute targets from the
/// image's root, `..` stopping at the root, as in a chroot). `None` if a component is
/// missing, not a directory, or the links loop.
pub fn resolve(manifest: &Manifest, path: &[u8]) -> Option<u32> {
    let mut pending: Vec<Vec<u8>> = split(path).into_iter().rev().collect();
    // The directories walked so far, root first, so that `..` can go back.
    let mut walked: Vec<u32> = vec![0];
    let mut links = 0;
    while let Some(part) = pending.pop() {
        let here = *walked.last().expect("the root is never popped");
        // Only a directory has `.`, `..` or children: `file/..` and `file/` do not
        // resolve (the kernel's ENOTDIR), rather than popping back past the file.
        if !matches!(manifest.inodes[here as usize].kind, InodeKind::Dir(_)) {
            return None;
        }
        if part == b"." {
            continue;
        }
        if part == b".." {
            if walked.len() > 1 {
                walked.pop();
            }
            continue;
        }
        let child = manifest.child(here, &part)?;
        match &manifest.inodes[child as usize].kind {
            InodeKind::Symlink(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return None;
                }
                if target.first() == Some(&b'/') {
                    walked.truncate(1);
                }
                pending.extend(split(target).into_iter().rev());
            }
            _ => walked.push(child),
        }
    }
    walked.last().copied()
}

/// A path's components, without empty ones; a trailing slash becomes a final `.`, so that
/// what it names must be a directory.
fn split(path: &[u8]) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = path
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    if path.ends_with(b"/") && !parts.is_empty() {
        parts.push(b".".to_vec());
    }
    parts
}

/// True for extents that read as zeros.
pub fn is_zero(extent: &Extent) -> bool {
    extent.chunk == ZERO_CHUNK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{manifest::Inode, source::RuntimeConfig, tree::Meta};

    #[test]
    fn symlinks_resolve_inside_the_image() {
        let inode = |kind| Inode {
            meta: Meta::default(),
            nlink: 1,
            kind,
        };
        // / { bin -> usr/bin, usr/ { bin/ { sh }, up -> ../.., abs -> /usr/bin/sh }, loop -> loop }
        let manifest = Manifest {
            config: RuntimeConfig::default(),
            chunk_size: 4096,
            inodes: vec![
                inode(InodeKind::Dir(vec![
                    (b"bin".to_vec(), 1),
                    (b"loop".to_vec(), 6),
                    (b"usr".to_vec(), 2),
                ])),
                inode(InodeKind::Symlink(b"usr/bin".to_vec())),
                inode(InodeKind::Dir(vec![
                    (b"abs".to_vec(), 5),
                    (b"bin".to_vec(), 3),
                    (b"up".to_vec(), 7),
                ])),
                inode(InodeKind::Dir(vec![(b"sh".to_vec(), 4)])),
                inode(InodeKind::File {
                    size: 0,
                    extents: vec![],
                }),
                inode(InodeKind::Symlink(b"/usr/bin/sh".to_vec())),
                inode(InodeKind::Symlink(b"loop".to_vec())),
                inode(InodeKind::Symlink(b"../../..".to_vec())),
            ],
            chunks: vec![],
            keys: vec![],
        };
        assert_eq!(resolve(&manifest, b"/bin/sh"), Some(4));
        assert_eq!(resolve(&manifest, b"usr/abs"), Some(4));
        assert_eq!(resolve(&manifest, b"/usr/up/usr/bin/sh"), Some(4));
        assert_eq!(resolve(&manifest, b"/"), Some(0));
        assert_eq!(resolve(&manifest, b"/loop"), None);
        assert_eq!(resolve(&manifest, b"/bin/sh/x"), None);
        // A file has no `..`, `.` or trailing slash (the kernel's ENOTDIR).
        assert_eq!(resolve(&manifest, b"/bin/sh/.."), None);
        assert_eq!(resolve(&manifest, b"/bin/sh/../sh"), None);
        assert_eq!(resolve(&manifest, b"/bin/sh/."), None);
        assert_eq!(resolve(&manifest, b"/bin/sh/"), None);
        assert_eq!(resolve(&manifest, b"/usr/./bin/sh"), Some(4));
        assert_eq!(resolve(&manifest, b"/usr/bin/"), Some(3));
        assert_eq!(resolve(&manifest, b"/bin/"), Some(3));
        assert_eq!(resolve(&manifest, b"/nothing"), None);
    }

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
