//! The data layout: which file bytes go into which chunk.
//!
//! The layout is where dedup across images is won or lost (see ../shared/BRIEF.md: whole
//! files in path order as one stream leave 80% of the corpus unique, against 43% for
//! whole-file dedup). The rules, all functions of the flattened tree alone:
//!
//! 1. Files are visited in path order (component by component).
//! 2. A file whose contents already appeared earlier in that order (same BLAKE3) takes the
//!    earlier file's extents: no new bytes, within an image and, because an image derived
//!    from another holds its files, mostly across images too.
//! 3. Large files (at least `max_packed` bytes) are cut into whole chunks from their first
//!    byte, so identical large files, and identical 512 KiB blocks at the same offsets of
//!    changed ones, make identical chunks whatever surrounds them.
//! 4. Small files, and the tails of large files shorter than `max_packed`, are packed into
//!    shared chunks in path order. Pack boundaries are content-defined at file
//!    granularity: a pack is closed after a file whose content hash satisfies
//!    `hash % boundary_divisor == 0` once it holds `pack_min` bytes, and before a file
//!    that would take it past the chunk size. Adding, removing or changing a file
//!    therefore changes the packs around it up to the next content-defined boundary, and
//!    nothing beyond: packs resynchronise instead of shifting every later chunk.
//! 5. Files are never split across packs, so a small file is always one read of one chunk.
//!
//! Chunks that turn out to be all zeros are not stored (decided when they are read).

use std::collections::HashMap;

use crate::{
    layer::Content,
    tree::{FlatKind, FlatTree},
};

/// Layout parameters. The defaults were chosen on the corpus (docs/PERFORMANCE.md has the
/// table of what each setting gave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutParams {
    /// Largest chunk, and the size large files are cut into.
    pub chunk_size: u32,
    /// Files (and tails of large files) shorter than this are packed with others; longer
    /// ones get chunks of their own. At most `chunk_size`.
    pub max_packed: u32,
    /// A pack holds at least this many bytes before a content-defined boundary may close it.
    pub pack_min: u32,
    /// A file ends a pack when its hash is 0 modulo this.
    pub boundary_divisor: u64,
}

impl Default for LayoutParams {
    fn default() -> Self {
        // On the corpus: 46.1% of all bytes unique after chunk dedup against 44.0% for
        // whole-file dedup (1.049x), with stored chunks of 300 KiB on average. Smaller
        // packs dedup better but make more, smaller objects; docs/PERFORMANCE.md has the
        // whole grid.
        Self {
            chunk_size: slapshot_core::CHUNK_SIZE as u32,
            max_packed: 64 << 10,
            pack_min: 64 << 10,
            boundary_divisor: 8,
        }
    }
}

impl LayoutParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.chunk_size < 4096 || self.chunk_size > 64 << 20 {
            return Err(format!(
                "a chunk size of {} bytes: use 4 KiB to 64 MiB",
                self.chunk_size
            ));
        }
        if self.max_packed > self.chunk_size || self.pack_min > self.chunk_size {
            return Err("pack settings larger than a chunk".into());
        }
        if self.boundary_divisor == 0 {
            return Err("a boundary divisor of 0".into());
        }
        Ok(())
    }
}

/// A piece of a planned chunk: `len` bytes of a file's contents from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub content: Content,
    pub offset: u64,
    pub len: u32,
}

/// A chunk to be built from pieces of files, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannedChunk {
    pub pieces: Vec<Piece>,
    pub len: u32,
}

/// Where a run of a file's bytes is: `len` bytes at `offset` in planned chunk `chunk`.
/// A file is the concatenation of its extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedExtent {
    pub chunk: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub chunks: Vec<PlannedChunk>,
    /// Per inode; empty for everything but non-empty regular files.
    pub extents: Vec<Vec<PlannedExtent>>,
}

/// Lays out the regular files of `tree`.
pub fn plan(tree: &FlatTree, params: &LayoutParams) -> Plan {
    let mut plan = Plan {
        chunks: Vec::new(),
        extents: vec![Vec::new(); tree.inodes.len()],
    };
    let mut first_with: HashMap<[u8; 32], u32> = HashMap::new();
    let mut packer = Packer::default();
    let chunk_size = u64::from(params.chunk_size);
    for ino in tree.path_order() {
        let FlatKind::File(content) = tree.inodes[ino as usize].kind else {
            continue;
        };
        if content.len == 0 {
            continue;
        }
        if let Some(&earlier) = first_with.get(&content.hash) {
            plan.extents[ino as usize] = plan.extents[earlier as usize].clone();
            continue;
        }
        first_with.insert(content.hash, ino);
        let mut offset = 0u64;
        if content.len >= u64::from(params.max_packed) {
            while content.len - offset >= chunk_size {
                let chunk = plan.chunks.len() as u32;
                plan.chunks.push(PlannedChunk {
                    pieces: vec![Piece {
                        content,
                        offset,
                        len: params.chunk_size,
                    }],
                    len: params.chunk_size,
                });
                plan.extents[ino as usize].push(PlannedExtent {
                    chunk,
                    offset: 0,
                    len: params.chunk_size,
                });
                offset += chunk_size;
            }
        }
        let rest = content.len - offset;
        if rest == 0 {
            continue;
        }
        let rest = rest as u32;
        let piece = Piece {
            content,
            offset,
            len: rest,
        };
        if rest >= params.max_packed {
            let chunk = plan.chunks.len() as u32;
            plan.chunks.push(PlannedChunk {
                pieces: vec![piece],
                len: rest,
            });
            plan.extents[ino as usize].push(PlannedExtent {
                chunk,
                offset: 0,
                len: rest,
            });
        } else {
            let key = u64::from_le_bytes(content.hash[..8].try_into().expect("8 bytes"));
            let extent = packer.add(&mut plan.chunks, params, piece, key);
            plan.extents[ino as usize].push(extent);
        }
    }
    plan
}

/// The pack being filled.
#[derive(Default)]
struct Packer {
    /// Index of the open pack in the chunk list, reserved when its first file arrives.
    open: Option<u32>,
}

impl Packer {
    fn add(
        &mut self,
        chunks: &mut Vec<PlannedChunk>,
        params: &LayoutParams,
        piece: Piece,
        boundary_key: u64,
    ) -> PlannedExtent {
        if let Some(open) = self.open
            && chunks[open as usize].len + piece.len > params.chunk_size
        {
            self.open = None;
        }
        let index = *self.open.get_or_insert_with(|| {
            chunks.push(PlannedChunk::default());
            chunks.len() as u32 - 1
        });
        let pack = &mut chunks[index as usize];
        let extent = PlannedExtent {
            chunk: index,
            offset: pack.len,
            len: piece.len,
        };
        pack.pieces.push(piece);
        pack.len += piece.len;
        if pack.len >= params.pack_min && boundary_key.is_multiple_of(params.boundary_divisor) {
            self.open = None;
        }
        extent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{FlatInode, Meta};

    /// A root directory holding files of the given sizes and content seeds, named in order.
    fn tree(files: &[(u64, u8)]) -> FlatTree {
        let mut inodes = vec![FlatInode {
            meta: Meta::default(),
            nlink: 2,
            kind: FlatKind::Dir(
                (0..files.len())
                    .map(|i| (format!("f{i:05}").into_bytes(), i as u32 + 1))
                    .collect(),
            ),
        }];
        for &(len, seed) in files {
            let mut hash = *blake3::hash(&[seed]).as_bytes();
            hash[31] = seed;
            inodes.push(FlatInode {
                meta: Meta::default(),
                nlink: 1,
                kind: FlatKind::File(Content {
                    layer: 0,
                    offset: 0,
                    len,
                    hash,
                }),
            });
        }
        FlatTree { inodes }
    }

    fn covered(plan: &Plan, ino: usize) -> u64 {
        plan.extents[ino].iter().map(|e| u64::from(e.len)).sum()
    }

    #[test]
    fn large_files_are_chunk_aligned_and_small_ones_packed() {
        let params = LayoutParams::default();
        let big = 3 * 512 * 1024 + 1000;
        let plan = plan(&tree(&[(big, 1), (100, 2), (200, 3), (0, 4)]), &params);
        // Three whole chunks for the big file; its 1000-byte tail and both small files
        // share one pack.
        assert_eq!(plan.extents[1].len(), 4);
        assert!(
            plan.extents[1][..3]
                .iter()
                .all(|e| e.offset == 0 && e.len == 512 * 1024)
        );
        assert_eq!(covered(&plan, 1), big);
        assert_eq!(plan.extents[2][0].chunk, plan.extents[1][3].chunk);
        assert_eq!(plan.extents[3][0].chunk, plan.extents[1][3].chunk);
        assert!(plan.extents[4].is_empty());
        assert_eq!(plan.chunks.len(), 4);
        for chunk in &plan.chunks {
            assert_eq!(chunk.len, chunk.pieces.iter().map(|p| p.len).sum::<u32>());
            assert!(chunk.len <= params.chunk_size);
        }
    }

    #[test]
    fn identical_contents_share_extents() {
        let plan = plan(&tree(&[(5000, 7), (5000, 7)]), &LayoutParams::default());
        assert_eq!(plan.extents[1], plan.extents[2]);
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.chunks[0].len, 5000);
    }

    #[test]
    fn packs_never_exceed_a_chunk_and_files_never_straddle() {
        let params = LayoutParams::default();
        let files: Vec<(u64, u8)> = (0..200)
            .map(|i| (((i * 7919) % 120_000) + 1, i as u8))
            .collect();
        let plan = plan(&tree(&files), &params);
        for (i, (len, _)) in files.iter().enumerate() {
            let extents = &plan.extents[i + 1];
            // Several files share a seed (and so a hash): those reuse the first's extents.
            assert_eq!(extents.len(), 1);
            assert_eq!(u64::from(extents[0].len), *len);
        }
        assert!(plan.chunks.iter().all(|c| c.len <= params.chunk_size));
    }

    #[test]
    fn an_inserted_file_disturbs_only_its_neighbourhood() {
        // 400 small files; then the same with one more file in the middle. With
        // content-defined pack boundaries most packs must stay byte-identical.
        let params = LayoutParams {
            pack_min: 16 << 10,
            boundary_divisor: 8,
            ..LayoutParams::default()
        };
        let base: Vec<(u64, u8)> = (0..400)
            .map(|i| (3000 + (i % 17) * 100, (i % 251) as u8))
            .collect();
        let mut with_insert = base.clone();
        with_insert.insert(200, (4321, 252));
        let a = plan(&tree(&base), &params);
        let b = plan(&tree(&with_insert), &params);
        let signature = |plan: &Plan| -> Vec<Vec<(u64, u8)>> {
            plan.chunks
                .iter()
                .map(|c| {
                    c.pieces
                        .iter()
                        .map(|p| (p.content.len, p.content.hash[31]))
                        .collect()
                })
                .collect()
        };
        let (sa, sb) = (signature(&a), signature(&b));
        let same = sa.iter().filter(|c| sb.contains(c)).count();
        assert!(
            same + 3 >= sa.len(),
            "{same} of {} packs survive an insertion",
            sa.len()
        );
    }
}
