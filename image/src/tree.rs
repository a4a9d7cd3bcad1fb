//! Applying layers, in order, into one filesystem tree.
//!
//! The result depends only on what the layers hold, never on the order of entries inside a
//! tar: a layer's entries are collected first, its whiteouts are applied to the layers
//! below, then its entries in path order (parents before children), then its hard links
//! (which may point at entries of the same layer in any order).
//!
//! Hostile input is refused with an error naming the layer and the entry:
//! - absolute paths, `..` components, NUL bytes, names over 255 bytes, paths over 4096;
//! - entries (and whiteouts) whose path goes through a symlink;
//! - a symlink whose relative target climbs above the root (absolute targets are kept:
//!   they are resolved inside the image's root, as in any container), checked on its own
//!   as it is added, and once the tree is whole, followed through every other link;
//! - hard links to a missing path, to a directory, or with `..` or absolute targets;
//! - the same path twice in one layer;
//! - more than 64 KiB of xattrs on one entry (Linux's own limit), or uid/gid above 2^32.
//!
//! aufs bookkeeping entries (`.wh..wh.*` other than the opaque marker) are ignored, as
//! Docker and containerd do.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    layer::{Content, LayerEntry, lossy},
    tar::EntryKind,
};

const MAX_NAME: usize = 255;
use crate::tar::{MAX_PATH_LEN as MAX_PATH, MAX_XATTR_BYTES};
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{layer}: entry {entry:?}: {message}")]
pub struct TreeError {
    pub layer: String,
    pub entry: String,
    pub message: String,
}

/// Metadata every node has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits, setuid, setgid and sticky (the low 12 bits of st_mode).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nanos: u32,
    /// Sorted by name, names unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

type NodeId = u32;

#[derive(Debug, Clone)]
enum Kind {
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File(Content),
    Symlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    meta: Meta,
}

/// The tree being built. Nodes replaced or removed stay in the arena unreachable.
pub struct Tree {
    nodes: Vec<Node>,
    /// The labels of the layers applied so far, and the layer each symlink came from, for
    /// the errors of [`Tree::check_symlinks`].
    labels: Vec<String>,
    symlink_layers: HashMap<NodeId, u32>,
}

const ROOT: NodeId = 0;

/// Steps all the symlink walks of one image may take together: a few per link in real
/// images (a million links of twenty steps each fit), and a bound on what a hostile one
/// can cost (about a second).
const SYMLINK_STEPS: u64 = 20_000_000;

/// Where following a symlink ends.
enum Walk {
    Inside,
    Escapes,
    OutOfSteps,
}

/// Metadata of directories that no entry describes (parents a layer implies).
fn implicit_dir_meta() -> Meta {
    Meta {
        mode: 0o755,
        ..Meta::default()
    }
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        Self {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: implicit_dir_meta(),
            }],
            labels: Vec::new(),
            symlink_layers: HashMap::new(),
        }
    }

    /// Applies one layer's entries on top of the tree.
    pub fn apply_layer(&mut self, label: &str, entries: &[LayerEntry]) -> Result<(), TreeError> {
        self.labels.push(label.to_owned());
        let mut seen: HashSet<Vec<&[u8]>> = HashSet::with_capacity(entries.len());
        let mut opaque: Vec<Vec<&[u8]>> = Vec::new();
        let mut whiteouts: Vec<(Vec<&[u8]>, &LayerEntry)> = Vec::new();
        let mut plain: Vec<(Vec<&[u8]>, &LayerEntry)> = Vec::new();
        let mut links: Vec<(Vec<&[u8]>, &LayerEntry)> = Vec::new();
        for entry in entries {
            let fail = |message: String| TreeError {
                layer: label.to_owned(),
                entry: lossy(&entry.header.path),
                message,
            };
            let path = components(&entry.header.path).map_err(fail)?;
            if !seen.insert(path.clone()) {
                return Err(fail("appears twice in the layer".into()));
            }
            match path.last() {
                Some(&name) if name == OPAQUE_MARKER => {
                    opaque.push(path[..path.len() - 1].to_vec());
                }
                Some(&name) if name.starts_with(AUFS_META_PREFIX) => {}
                Some(&name) if name.starts_with(WHITEOUT_PREFIX) => {
                    let hidden = &name[WHITEOUT_PREFIX.len()..];
                    if hidden.is_empty() || hidden == b"." || hidden == b".." {
                        return Err(fail("a whiteout that names no file".into()));
                    }
                    let mut target = path[..path.len() - 1].to_vec();
                    target.push(hidden);
                    whiteouts.push((target, entry));
                }
                _ if entry.header.kind == EntryKind::HardLink => links.push((path, entry)),
                _ => plain.push((path, entry)),
            }
        }

        // Whiteouts hide what the layers below hold, never this layer's own entries.
        for dir in &opaque {
            let fail = |message: String| TreeError {
                layer: label.to_owned(),
                entry: join(dir, OPAQUE_MARKER),
                message,
            };
            if let Some(id) = self.find(dir).map_err(fail)?
                && let Kind::Dir(children) = &mut self.nodes[id as usize].kind
            {
                children.clear();
            }
        }
        let layer_dirs: HashSet<&[&[u8]]> = plain
            .iter()
            .filter(|(_, e)| e.header.kind == EntryKind::Directory)
            .map(|(p, _)| p.as_slice())
            .collect();
        for (path, entry) in &whiteouts {
            let fail = |message: String| TreeError {
                layer: label.to_owned(),
                entry: lossy(&entry.header.path),
                message,
            };
            let (parent, name) = path.split_at(path.len() - 1);
            if let Some(id) = self.find(parent).map_err(fail)? {
                match &mut self.nodes[id as usize].kind {
                    Kind::Dir(children) => {
                        children.remove(name[0]);
                    }
                    // Whiting out inside a symlink would reach wherever it points, unless
                    // this layer replaces the symlink with a directory of its own.
                    Kind::Symlink(_) if !layer_dirs.contains(parent) => {
                        return Err(fail(format!(
                            "goes through the symlink {:?}",
                            join_all(parent)
                        )));
                    }
                    _ => {}
                }
            }
        }

        plain.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, entry) in &plain {
            self.add(path, entry).map_err(|message| TreeError {
                layer: label.to_owned(),
                entry: lossy(&entry.header.path),
                message,
            })?;
        }

        // Hard links may point at other hard links of the same layer, in any order: each is
        // applied after the chain of links it points through (followed once, remembered), so
        // n links cost O(n) whatever their order, and a cycle is an error.
        links.sort_by(|a, b| a.0.cmp(&b.0));
        let by_path: HashMap<&[&[u8]], &LayerEntry> =
            links.iter().map(|(p, e)| (p.as_slice(), *e)).collect();
        let mut applied: HashSet<&[&[u8]]> = HashSet::with_capacity(links.len());
        for (path, _) in &links {
            let mut chain: Vec<&[&[u8]]> = Vec::new();
            let mut on_chain: HashSet<&[&[u8]]> = HashSet::new();
            let mut current: &[&[u8]] = path.as_slice();
            loop {
                if applied.contains(current) {
                    break;
                }
                if !on_chain.insert(current) {
                    let entry = by_path[current];
                    return Err(TreeError {
                        layer: label.to_owned(),
                        entry: lossy(&entry.header.path),
                        message: "a cycle of hard links".into(),
                    });
                }
                chain.push(current);
                let entry = by_path[current];
                let target = components(&entry.header.link).map_err(|e| TreeError {
                    layer: label.to_owned(),
                    entry: lossy(&entry.header.path),
                    message: format!("hard link target {:?}: {e}", lossy(&entry.header.link)),
                })?;
                match by_path.get_key_value(target.as_slice()) {
                    Some((&key, _)) => current = key,
                    None => break,
                }
            }
            for &link in chain.iter().rev() {
                let entry = by_path[link];
                let fail = |message: String| TreeError {
                    layer: label.to_owned(),
                    entry: lossy(&entry.header.path),
                    message,
                };
                match self.link(link, entry).map_err(fail)? {
                    true => {
                        applied.insert(link);
                    }
                    false => {
                        return Err(fail(format!(
                            "hard link to {:?}, which does not exist",
                            lossy(&entry.header.link)
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The node at `path`, if every component exists; an error if the path goes through a
    /// symlink.
    fn find(&self, path: &[&[u8]]) -> Result<Option<NodeId>, String> {
        let mut id = ROOT;
        for (depth, name) in path.iter().enumerate() {
            let Kind::Dir(children) = &self.nodes[id as usize].kind else {
                if matches!(self.nodes[id as usize].kind, Kind::Symlink(_)) {
                    return Err(format!(
                        "goes through the symlink {:?}",
                        join_all(&path[..depth])
                    ));
                }
                return Ok(None);
            };
            match children.get(*name) {
                Some(&child) => id = child,
                None => return Ok(None),
            }
        }
        Ok(Some(id))
    }

    /// The directory at `path`, creating missing directories with default metadata.
    fn dir(&mut self, path: &[&[u8]]) -> Result<NodeId, String> {
        let mut id = ROOT;
        for (depth, name) in path.iter().enumerate() {
            let next = match &self.nodes[id as usize].kind {
                Kind::Dir(children) => children.get(*name).copied(),
                _ => unreachable!("only directories are walked into"),
            };
            id = match next {
                Some(child) => match self.nodes[child as usize].kind {
                    Kind::Dir(_) => child,
                    Kind::Symlink(_) => {
                        return Err(format!(
                            "goes through the symlink {:?}",
                            join_all(&path[..=depth])
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "its parent {:?} is not a directory",
                            join_all(&path[..=depth])
                        ));
                    }
                },
                None => {
                    let child = self.push(Node {
                        kind: Kind::Dir(BTreeMap::new()),
                        meta: implicit_dir_meta(),
                    });
                    self.children(id).insert(name.to_vec(), child);
                    child
                }
            };
        }
        Ok(id)
    }

    fn push(&mut self, node: Node) -> NodeId {
        let id = NodeId::try_from(self.nodes.len()).expect("entries are limited far below 2^32");
        self.nodes.push(node);
        id
    }

    fn children(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, NodeId> {
        match &mut self.nodes[dir as usize].kind {
            Kind::Dir(children) => children,
            _ => unreachable!("callers pass directories"),
        }
    }

    fn add(&mut self, path: &[&[u8]], entry: &LayerEntry) -> Result<(), String> {
        let header = &entry.header;
        let meta = meta_of(entry)?;
        let kind = match header.kind {
            EntryKind::Directory => Kind::Dir(BTreeMap::new()),
            EntryKind::Regular => Kind::File(entry.content.ok_or("a file without contents")?),
            EntryKind::Symlink => {
                check_symlink(path, &header.link)?;
                Kind::Symlink(header.link.clone())
            }
            EntryKind::CharDevice => Kind::CharDevice(header.dev_major, header.dev_minor),
            EntryKind::BlockDevice => Kind::BlockDevice(header.dev_major, header.dev_minor),
            EntryKind::Fifo => Kind::Fifo,
            EntryKind::HardLink => unreachable!("hard links are applied by link()"),
        };
        let Some((name, parent)) = path.split_last() else {
            // The root itself: only a directory may describe it.
            return match kind {
                Kind::Dir(_) => {
                    self.nodes[ROOT as usize].meta = meta;
                    Ok(())
                }
                _ => Err("the root must be a directory".into()),
            };
        };
        let parent = self.dir(parent)?;
        let existing = self.children(parent).get(*name).copied();
        if let (Kind::Dir(_), Some(old)) = (&kind, existing)
            && matches!(self.nodes[old as usize].kind, Kind::Dir(_))
        {
            // A directory over a directory keeps what is inside and takes the new metadata.
            self.nodes[old as usize].meta = meta;
            return Ok(());
        }
        let is_symlink = matches!(kind, Kind::Symlink(_));
        let id = self.push(Node { kind, meta });
        if is_symlink {
            let layer = u32::try_from(self.labels.len().saturating_sub(1)).unwrap_or(u32::MAX);
            self.symlink_layers.insert(id, layer);
        }
        self.children(parent).insert(name.to_vec(), id);
        Ok(())
    }

    /// Refuses a relative symlink that, followed as the kernel follows it (through the
    /// image's other symlinks), climbs above the image's root. Each link's own target was
    /// checked when it was added; a chain of links that are each harmless (`a/up -> ..`,
    /// then `e -> a/up/..`), or a hard link that gives a symlink a shallower name, is only
    /// seen in the finished tree. Run once all layers are applied; every name of every
    /// symlink is checked from its own directory. Once a walk reaches an absolute target it
    /// is inside the image's root for good (`..` stops there, as in a container), as the
    /// policy for absolute targets says.
    ///
    /// The walks share one budget of steps, so that a small image of many links through
    /// long chains cannot make this take hours; an image past it is refused.
    pub fn check_symlinks(&self) -> Result<(), TreeError> {
        let mut budget = SYMLINK_STEPS;
        // Depth first over the directories, with the directory chain and names of each.
        let mut stack: Vec<(Vec<NodeId>, Vec<&[u8]>)> = vec![(vec![ROOT], Vec::new())];
        while let Some((dirs, names)) = stack.pop() {
            let here = *dirs.last().expect("the root at least");
            let Kind::Dir(children) = &self.nodes[here as usize].kind else {
                continue;
            };
            for (name, &child) in children {
                let message = match &self.nodes[child as usize].kind {
                    Kind::Dir(_) => {
                        let mut dirs = dirs.clone();
                        dirs.push(child);
                        let mut names = names.clone();
                        names.push(name);
                        stack.push((dirs, names));
                        continue;
                    }
                    Kind::Symlink(target) => {
                        match self.walk_link(dirs.clone(), target, &mut budget) {
                            Walk::Inside => continue,
                            Walk::Escapes => format!(
                                "a symlink to {:?} that, followed through the image's other links, leaves the image's root",
                                lossy(target)
                            ),
                            Walk::OutOfSteps => format!(
                                "the image's symlinks take more than {SYMLINK_STEPS} steps to follow (links through long chains of links); refused"
                            ),
                        }
                    }
                    _ => continue,
                };
                let layer = self
                    .symlink_layers
                    .get(&child)
                    .and_then(|&i| self.labels.get(i as usize))
                    .cloned()
                    .unwrap_or_else(|| "a layer".into());
                let mut path = names.clone();
                path.push(name);
                return Err(TreeError {
                    layer,
                    entry: join_all(&path),
                    message,
                });
            }
        }
        Ok(())
    }

    /// Follows `target` from the directory chain `walked` (root first). Past a missing
    /// component the walk goes on by the text alone (a container may create what is
    /// missing) until a `..` brings it back to the last real directory; past a file
    /// nothing resolves; a loop resolves to nothing (ELOOP).
    fn walk_link<'a>(
        &'a self,
        mut walked: Vec<NodeId>,
        target: &'a [u8],
        budget: &mut u64,
    ) -> Walk {
        /// Queues a link's target; true if it is absolute (the walk restarts at the root).
        fn follow<'a>(
            target: &'a [u8],
            walked: &mut Vec<NodeId>,
            pending: &mut Vec<&'a [u8]>,
        ) -> bool {
            pending.extend(target.split(|&b| b == b'/').rev());
            let absolute = target.first() == Some(&b'/');
            if absolute {
                walked.truncate(1);
            }
            absolute
        }
        let mut pending: Vec<&[u8]> = Vec::new();
        // Once an absolute target is followed, `..` at the root stays there.
        let mut anchored = follow(target, &mut walked, &mut pending);
        // Levels below the last real directory, where the walk went through missing names.
        let mut virtual_depth = 0usize;
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if *budget == 0 {
                return Walk::OutOfSteps;
            }
            *budget -= 1;
            match part {
                b"" | b"." => {}
                b".." if virtual_depth > 0 => virtual_depth -= 1,
                b".." => {
                    if walked.len() == 1 {
                        if !anchored {
                            return Walk::Escapes;
                        }
                    } else {
                        walked.pop();
                    }
                }
                _ if virtual_depth > 0 => virtual_depth += 1,
                name => {
                    let here = *walked.last().expect("the root at least");
                    let child = match &self.nodes[here as usize].kind {
                        Kind::Dir(children) => children.get(name).copied(),
                        _ => None,
                    };
                    let Some(child) = child else {
                        virtual_depth = 1;
                        continue;
                    };
                    match &self.nodes[child as usize].kind {
                        Kind::Dir(_) => walked.push(child),
                        Kind::Symlink(next) => {
                            links += 1;
                            if links > crate::read::MAX_SYMLINKS {
                                return Walk::Inside;
                            }
                            anchored |= follow(next, &mut walked, &mut pending);
                        }
                        // A file, device or fifo: anything after it fails (ENOTDIR).
                        _ => return Walk::Inside,
                    }
                }
            }
        }
        Walk::Inside
    }

    /// Adds a hard link; false if its target does not exist yet.
    fn link(&mut self, path: &[&[u8]], entry: &LayerEntry) -> Result<bool, String> {
        let target_path = components(&entry.header.link)
            .map_err(|e| format!("hard link target {:?}: {e}", lossy(&entry.header.link)))?;
        if target_path.as_slice() == path {
            return Err("a hard link to itself".into());
        }
        let Some(target) = self.find(&target_path)? else {
            return Ok(false);
        };
        if matches!(self.nodes[target as usize].kind, Kind::Dir(_)) {
            return Err(format!(
                "hard link to the directory {:?}",
                lossy(&entry.header.link)
            ));
        }
        let Some((name, parent)) = path.split_last() else {
            return Err("a hard link cannot be the root".into());
        };
        let parent = self.dir(parent)?;
        self.children(parent).insert(name.to_vec(), target);
        Ok(true)
    }

    /// Numbers the reachable nodes in path order and counts their links.
    pub fn finish(self) -> FlatTree {
        let mut numbering: Vec<Option<u32>> = vec![None; self.nodes.len()];
        let mut order: Vec<NodeId> = Vec::new();
        let mut links: Vec<u32> = Vec::new();
        // Breadth-first, children by name: a directory's children get consecutive
        // numbers, so the manifest codes them as "the next number" in almost no space, and
        // the numbering is a function of the tree alone, which determinism needs.
        let mut queue = std::collections::VecDeque::from([ROOT]);
        numbering[ROOT as usize] = Some(0);
        order.push(ROOT);
        links.push(0);
        while let Some(id) = queue.pop_front() {
            if let Kind::Dir(children) = &self.nodes[id as usize].kind {
                for &child in children.values() {
                    match numbering[child as usize] {
                        Some(n) => links[n as usize] += 1,
                        None => {
                            let n = order.len() as u32;
                            numbering[child as usize] = Some(n);
                            order.push(child);
                            links.push(1);
                            queue.push_back(child);
                        }
                    }
                }
            }
        }
        let inodes = order
            .iter()
            .enumerate()
            .map(|(n, &id)| {
                let node = &self.nodes[id as usize];
                let kind = match &node.kind {
                    Kind::Dir(children) => FlatKind::Dir(
                        children
                            .iter()
                            .map(|(name, &child)| {
                                (name.clone(), numbering[child as usize].expect("numbered"))
                            })
                            .collect(),
                    ),
                    Kind::File(content) => FlatKind::File(*content),
                    Kind::Symlink(target) => FlatKind::Symlink(target.clone()),
                    Kind::CharDevice(major, minor) => FlatKind::CharDevice(*major, *minor),
                    Kind::BlockDevice(major, minor) => FlatKind::BlockDevice(*major, *minor),
                    Kind::Fifo => FlatKind::Fifo,
                };
                // A directory's links: its name, its ".", and each subdirectory's "..".
                let nlink = match &kind {
                    FlatKind::Dir(children) => {
                        2 + children
                            .iter()
                            .filter(|(_, c)| {
                                matches!(self.nodes[order[*c as usize] as usize].kind, Kind::Dir(_))
                            })
                            .count() as u32
                    }
                    _ => links[n],
                };
                FlatInode {
                    meta: node.meta.clone(),
                    nlink,
                    kind,
                }
            })
            .collect();
        FlatTree { inodes }
    }
}

/// The finished tree: inodes numbered from 0 (the root), directories listing their
/// children by name with the child's number.
#[derive(Debug, Clone)]
pub struct FlatTree {
    pub inodes: Vec<FlatInode>,
}

impl FlatTree {
    /// Inode numbers in the order their first path sorts in (component by component), each
    /// once: the order the data layout packs files in.
    pub fn path_order(&self) -> Vec<u32> {
        let mut seen = vec![false; self.inodes.len()];
        let mut out = Vec::with_capacity(self.inodes.len());
        let mut stack: Vec<(u32, usize)> = vec![(0, 0)];
        seen[0] = true;
        out.push(0);
        while let Some((dir, next)) = stack.pop() {
            let FlatKind::Dir(children) = &self.inodes[dir as usize].kind else {
                continue;
            };
            let Some(&(_, child)) = children.get(next) else {
                continue;
            };
            stack.push((dir, next + 1));
            if !seen[child as usize] {
                seen[child as usize] = true;
                out.push(child);
                stack.push((child, 0));
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct FlatInode {
    pub meta: Meta,
    pub nlink: u32,
    pub kind: FlatKind,
}

#[derive(Debug, Clone)]
pub enum FlatKind {
    Dir(Vec<(Vec<u8>, u32)>),
    File(Content),
    Symlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

fn meta_of(entry: &LayerEntry) -> Result<Meta, String> {
    let header = &entry.header;
    let id = |value: u64, what: &str| {
        u32::try_from(value).map_err(|_| format!("{what} {value} does not fit in 32 bits"))
    };
    let mut xattrs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut total = 0usize;
    for (name, value) in &header.xattrs {
        total += name.len() + 1 + value.len();
        if name.is_empty() || name.contains(&0) {
            return Err("an xattr with an empty name or a NUL in its name".into());
        }
        xattrs.insert(name.clone(), value.clone());
    }
    if total > MAX_XATTR_BYTES {
        return Err(format!(
            "{total} bytes of xattrs, more than Linux's {MAX_XATTR_BYTES}"
        ));
    }
    Ok(Meta {
        mode: header.mode & 0o7777,
        uid: id(header.uid, "uid")?,
        gid: id(header.gid, "gid")?,
        mtime: header.mtime,
        mtime_nanos: header.mtime_nanos.min(999_999_999),
        xattrs: xattrs.into_iter().collect(),
    })
}

/// A path's components, with `.` and empty components dropped. Refuses absolute paths,
/// `..`, NUL bytes and overlong names.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.len() > MAX_PATH {
        return Err(format!(
            "a path of {} bytes (the limit is {MAX_PATH})",
            path.len()
        ));
    }
    if path.contains(&0) {
        return Err("a NUL byte in the path".into());
    }
    if path.first() == Some(&b'/') {
        return Err("an absolute path".into());
    }
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("a '..' component".into()),
            name if name.len() > MAX_NAME => {
                return Err(format!(
                    "a name of {} bytes (the limit is {MAX_NAME})",
                    name.len()
                ));
            }
            name => out.push(name),
        }
    }
    Ok(out)
}

/// Refuses relative symlink targets that climb above the root from where the link is.
fn check_symlink(path: &[&[u8]], target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("a symlink with an empty target".into());
    }
    if target.len() > MAX_PATH || target.contains(&0) {
        return Err("a symlink target that is too long or holds a NUL".into());
    }
    if target.first() == Some(&b'/') {
        return Ok(());
    }
    // The link's directory is `depth` levels below the root.
    let mut depth = path.len().saturating_sub(1) as isize;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "a symlink to {:?}, which leaves the image's root",
                        lossy(target)
                    ));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

fn join_all(parts: &[&[u8]]) -> String {
    lossy(&parts.join(&b'/'))
}

fn join(parts: &[&[u8]], last: &[u8]) -> String {
    let mut all = parts.to_vec();
    all.push(last);
    join_all(&all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::EntryHeader;

    fn entry(path: &str, kind: EntryKind) -> LayerEntry {
        LayerEntry {
            header: EntryHeader {
                path: path.as_bytes().to_vec(),
                kind,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: 0,
                mtime_nanos: 0,
                link: Vec::new(),
                dev_major: 0,
                dev_minor: 0,
                xattrs: Vec::new(),
            },
            content: (kind == EntryKind::Regular).then_some(Content {
                layer: 0,
                offset: 0,
                len: 0,
                hash: [path.len() as u8; 32],
            }),
        }
    }

    fn link(path: &str, kind: EntryKind, target: &str) -> LayerEntry {
        let mut e = entry(path, kind);
        e.header.link = target.as_bytes().to_vec();
        e
    }

    fn paths(tree: &FlatTree) -> Vec<String> {
        fn walk(tree: &FlatTree, ino: u32, prefix: &str, out: &mut Vec<String>) {
            if let FlatKind::Dir(children) = &tree.inodes[ino as usize].kind {
                for (name, child) in children {
                    let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
                    out.push(path.clone());
                    walk(tree, *child, &path, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(tree, 0, "", &mut out);
        out
    }

    use EntryKind::*;

    #[test]
    fn whiteouts_and_opaque_directories() {
        let mut tree = Tree::new();
        tree.apply_layer(
            "l0",
            &[
                entry("a", Directory),
                entry("a/x", Regular),
                entry("a/y", Regular),
                entry("b", Directory),
                entry("b/z", Regular),
                entry("c", Regular),
            ],
        )
        .unwrap();
        tree.apply_layer(
            "l1",
            &[
                entry("a/.wh.x", Regular),
                entry("b/.wh..wh..opq", Regular),
                entry("b/new", Regular),
                // A whiteout and a file of the same name in one layer: the file stays.
                entry(".wh.c", Regular),
                entry("c", Regular),
                entry(".wh.missing", Regular),
            ],
        )
        .unwrap();
        assert_eq!(paths(&tree.finish()), ["/a", "/a/y", "/b", "/b/new", "/c"]);
    }

    #[test]
    fn entry_order_inside_a_layer_does_not_matter() {
        let entries = vec![
            entry("d/e/f", Regular),
            link("d/hard", HardLink, "d/e/f"),
            entry("d", Directory),
            link("d/hard2", HardLink, "d/hard"),
            link("d/sym", Symlink, "e/f"),
        ];
        let mut reversed = entries.clone();
        reversed.reverse();
        let mut a = Tree::new();
        a.apply_layer("l", &entries).unwrap();
        let mut b = Tree::new();
        b.apply_layer("l", &reversed).unwrap();
        let (a, b) = (a.finish(), b.finish());
        assert_eq!(paths(&a), paths(&b));
        assert_eq!(format!("{:?}", a.inodes), format!("{:?}", b.inodes));
        // Three names, one inode with three links.
        let files: Vec<_> = a
            .inodes
            .iter()
            .filter(|i| matches!(i.kind, FlatKind::File(_)))
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].nlink, 3);
    }

    #[test]
    fn hostile_paths_are_refused() {
        for (entries, needle) in [
            (vec![entry("/etc/passwd", Regular)], "absolute"),
            (vec![entry("a/../../x", Regular)], "'..'"),
            (vec![entry("a", Regular), entry("./a", Regular)], "twice"),
            (
                vec![link("l", Symlink, "/etc"), entry("l/passwd", Regular)],
                "symlink",
            ),
            (
                vec![link("a/b/l", Symlink, "../../../x")],
                "leaves the image",
            ),
            (vec![link("h", HardLink, "../x")], "'..'"),
            (vec![link("h", HardLink, "nothing")], "does not exist"),
            (
                vec![entry("d", Directory), link("h", HardLink, "d")],
                "directory",
            ),
            (
                vec![entry("f", Regular), entry("f/x", Regular)],
                "not a directory",
            ),
            (vec![entry(&"n".repeat(256), Regular)], "name of 256"),
        ] {
            let mut tree = Tree::new();
            let err = tree.apply_layer("layer 0", &entries).unwrap_err();
            assert!(
                err.to_string().contains(needle) && err.to_string().contains("layer 0"),
                "{err} should mention {needle}"
            );
        }
        // Chains of links that each stay inside, and a hard link that gives a symlink a
        // shallower name, are caught once the tree is whole.
        for (entries, culprit) in [
            (
                vec![
                    entry("a", Directory),
                    link("a/up", Symlink, ".."),
                    link("e1", Symlink, "a/up/.."),
                ],
                "e1",
            ),
            (
                vec![
                    entry("a", Directory),
                    link("a/up", Symlink, ".."),
                    link("e1", Symlink, "a/up"),
                    link("e2", Symlink, "e1/../etc/passwd"),
                ],
                "e2",
            ),
            (
                vec![
                    entry("a", Directory),
                    entry("a/b", Directory),
                    entry("a/b/c", Directory),
                    link("a/b/c/l", Symlink, "../../../etc/passwd"),
                    link("top", HardLink, "a/b/c/l"),
                ],
                "top",
            ),
            (
                // Past a missing name, `..` comes back to the real tree and its links.
                vec![
                    entry("a", Directory),
                    link("a/up", Symlink, ".."),
                    link("x", Symlink, "missing/../a/up/../../etc"),
                ],
                "x",
            ),
        ] {
            let mut tree = Tree::new();
            tree.apply_layer("layer 3", &entries).unwrap();
            let err = tree.check_symlinks().unwrap_err().to_string();
            assert!(
                err.contains("layer 3")
                    && err.contains(&format!("{culprit:?}"))
                    && err.contains("leaves the image's root"),
                "{err}"
            );
        }
        // What stays inside passes: links to the root and up to it, absolute targets,
        // links through links, a missing component followed by as many `..`, loops.
        let mut tree = Tree::new();
        tree.apply_layer(
            "l",
            &[
                entry("usr", Directory),
                entry("usr/bin", Directory),
                link("bin", Symlink, "usr/bin"),
                link("usr/bin/root", Symlink, "../.."),
                link("usr/bin/abs", Symlink, "/usr/bin/../../bin"),
                link("usr/bin/via", Symlink, "root/bin/../usr"),
                link("usr/gone", Symlink, "missing/.."),
                link("usr/loop1", Symlink, "loop2"),
                link("usr/loop2", Symlink, "loop1"),
                link("usr/file-dotdot", Symlink, "../bin/../etc"),
                // Absolute targets are resolved inside the image's root: `..` stops there.
                link("usr/abs-up", Symlink, "/../etc"),
                link("usr/slash", Symlink, "/"),
                link("usr/through-slash", Symlink, "slash/../../etc"),
            ],
        )
        .unwrap();
        tree.check_symlinks().unwrap();

        // Many links through long chains of links: refused once they cost too much to
        // follow, not followed for hours.
        let mut entries = Vec::new();
        let padding = "./".repeat(1000);
        for i in 0..40 {
            entries.push(link(
                &format!("l{i}"),
                Symlink,
                &format!("{padding}l{}", i + 1),
            ));
        }
        entries.push(entry("l40", Directory));
        for i in 0..1000 {
            entries.push(link(&format!("v{i}"), Symlink, "l0"));
        }
        let mut tree = Tree::new();
        tree.apply_layer("heavy", &entries).unwrap();
        let err = tree.check_symlinks().unwrap_err().to_string();
        assert!(err.contains("heavy") && err.contains("steps"), "{err}");

        // A whiteout through a symlink is refused too.
        let mut tree = Tree::new();
        tree.apply_layer("l0", &[link("l", Symlink, "d"), entry("d", Directory)])
            .unwrap();
        assert!(
            tree.apply_layer("l1", &[entry("l/.wh.x", Regular)])
                .is_err()
        );
        // Relative links that stay inside are fine, and so are absolute ones.
        let mut tree = Tree::new();
        tree.apply_layer(
            "l",
            &[
                link("a/b/l", Symlink, "../../x"),
                link("a/abs", Symlink, "/usr/bin/env"),
            ],
        )
        .unwrap();
    }

    #[test]
    fn long_chains_of_hard_links_resolve_in_linear_time_and_cycles_are_refused() {
        // l0 -> l1 -> ... -> l{n-1} -> file, listed in the worst order for rounds.
        let n = 20_000;
        let mut entries = vec![entry("file", Regular)];
        for i in 0..n {
            let target = if i + 1 == n {
                "file".to_owned()
            } else {
                format!("l{:06}", i + 1)
            };
            entries.push(link(&format!("l{i:06}"), HardLink, &target));
        }
        // (Resolved in rounds, as before, this took minutes: each round resolved one link.)
        let mut tree = Tree::new();
        tree.apply_layer("l", &entries).unwrap();
        let flat = tree.finish();
        let file = flat
            .inodes
            .iter()
            .find(|i| matches!(i.kind, FlatKind::File(_)))
            .unwrap();
        assert_eq!(file.nlink as usize, n + 1);
        let mut tree = Tree::new();
        let err = tree
            .apply_layer("l", &[link("a", HardLink, "b"), link("b", HardLink, "a")])
            .unwrap_err();
        assert!(err.message.contains("cycle"), "{err}");
    }

    #[test]
    fn replacing_across_layers() {
        let mut tree = Tree::new();
        tree.apply_layer("l0", &[entry("d/x", Regular), entry("f", Regular)])
            .unwrap();
        // A file replaces a directory (and its subtree), a directory replaces a file, and a
        // directory over a directory keeps its children but takes the new mode.
        let mut dir = entry("d", Directory);
        dir.header.mode = 0o700;
        tree.apply_layer("l1", &[dir, entry("f", Directory)])
            .unwrap();
        let flat = tree.finish();
        assert_eq!(paths(&flat), ["/d", "/d/x", "/f"]);
        assert_eq!(flat.inodes[1].meta.mode, 0o700);
        let mut tree = Tree::new();
        tree.apply_layer("l0", &[entry("d/x", Regular)]).unwrap();
        tree.apply_layer("l1", &[entry("d", Regular)]).unwrap();
        assert_eq!(paths(&tree.finish()), ["/d"]);
    }
}
