//! A small real image from this machine's own files: a shell, some coreutils, and every
//! shared library they load, found by reading their ELF headers (no `ldd`, no external
//! tools). The demo flattens and runs it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use slapshot_image::{
    build::{LayerBuilder, LayerCompression, write_oci},
    source::RuntimeConfig,
};

/// What goes into the image: kept small, but enough to run real commands.
pub const PROGRAMS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "echo",
    "wc",
    "head",
    "sha256sum",
    "uname",
    "du",
    "sort",
    "env",
    "mkdir",
    "rm",
    "true",
    "false",
    "sleep",
    "seq",
    "cp",
    "id",
    "stat",
];

/// Directories searched for libraries, as the dynamic loader would on a Debian-like system.
const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

#[derive(Debug, thiserror::Error)]
pub enum HostImageError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Elf { path: PathBuf, message: String },
    #[error("none of the programs {0:?} were found on this machine")]
    NoPrograms(Vec<String>),
}

/// The files and links gathered from the host: what the layers will hold.
#[derive(Debug, Default)]
struct Gathered {
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    links: BTreeMap<PathBuf, PathBuf>,
}

impl Gathered {
    /// Adds `path` as the host resolves it: every symlink met on the way (so that the
    /// image resolves it the same way), its directories, and the file it ends at.
    fn include(&mut self, path: &Path) -> Result<PathBuf, HostImageError> {
        let io = |error| HostImageError::Io {
            path: path.to_owned(),
            error,
        };
        let mut current = PathBuf::from("/");
        let mut pending: VecDeque<PathBuf> = components(path);
        let mut hops = 0;
        while let Some(part) = pending.pop_front() {
            if part.as_os_str() == ".." {
                current.pop();
                continue;
            }
            let next = current.join(&part);
            let meta = std::fs::symlink_metadata(&next).map_err(io)?;
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    return Err(io(std::io::Error::other("too many symlinks")));
                }
                let target = std::fs::read_link(&next).map_err(io)?;
                self.links.insert(next.clone(), target.clone());
                if target.is_absolute() {
                    current = PathBuf::from("/");
                }
                let mut rest = components(&target);
                rest.extend(pending);
                pending = rest;
            } else {
                if meta.is_dir() {
                    self.dirs.insert(next.clone());
                }
                current = next;
            }
        }
        self.files.insert(current.clone());
        if let Some(parent) = current.parent() {
            let mut dir = PathBuf::from("/");
            for c in components(parent) {
                dir.push(c);
                self.dirs.insert(dir.clone());
            }
        }
        Ok(current)
    }
}

fn components(path: &Path) -> VecDeque<PathBuf> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect()
}

/// What a dynamic executable asks of the loader.
struct ElfNeeds {
    interpreter: Option<String>,
    libraries: Vec<String>,
    search_paths: Vec<String>,
}

/// The program's interpreter and needed libraries, from its ELF headers.
fn elf_dependencies(path: &Path) -> Result<ElfNeeds, HostImageError> {
    let bytes = std::fs::read(path).map_err(|error| HostImageError::Io {
        path: path.to_owned(),
        error,
    })?;
    let bad = |message: &str| HostImageError::Elf {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    // ELF64, little endian: the only kind the demo supports (x86_64 and aarch64 Linux).
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    };
    let phoff = u64_at(0x20).ok_or_else(|| bad("short header"))? as usize;
    let phentsize = u16_at(0x36).ok_or_else(|| bad("short header"))? as usize;
    let phnum = u16_at(0x38).ok_or_else(|| bad("short header"))? as usize;
    let mut interp = None;
    let mut dynamic = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let kind = u32_at(at).ok_or_else(|| bad("short program header"))?;
        let offset = u64_at(at + 8).ok_or_else(|| bad("short program header"))?;
        let vaddr = u64_at(at + 16).ok_or_else(|| bad("short program header"))?;
        let filesz = u64_at(at + 32).ok_or_else(|| bad("short program header"))?;
        match kind {
            1 => loads.push((vaddr, offset, filesz)),
            2 => dynamic = Some((offset as usize, filesz as usize)),
            3 => {
                let raw = bytes
                    .get(offset as usize..(offset + filesz) as usize)
                    .ok_or_else(|| bad("interpreter out of range"))?;
                interp = Some(
                    String::from_utf8_lossy(raw.split(|&b| b == 0).next().unwrap_or(&[]))
                        .into_owned(),
                );
            }
            _ => {}
        }
    }
    let Some((dyn_offset, dyn_size)) = dynamic else {
        return Ok(ElfNeeds {
            interpreter: interp,
            libraries: Vec::new(),
            search_paths: Vec::new(),
        });
    };
    let mut needed = Vec::new();
    let mut runpaths = Vec::new();
    let mut strtab = None;
    for entry in (dyn_offset..dyn_offset + dyn_size).step_by(16) {
        let tag = u64_at(entry).ok_or_else(|| bad("dynamic section out of range"))?;
        let value = u64_at(entry + 8).ok_or_else(|| bad("dynamic section out of range"))?;
        match tag {
            0 => break,
            1 => needed.push(value),
            5 => strtab = Some(value),
            15 | 29 => runpaths.push(value),
            _ => {}
        }
    }
    let strtab = strtab.ok_or_else(|| bad("no string table"))?;
    // The string table's address is virtual: find the loaded segment that holds it.
    let strtab_offset = loads
        .iter()
        .find(|(vaddr, _, size)| strtab >= *vaddr && strtab < vaddr + size)
        .map(|(vaddr, offset, _)| strtab - vaddr + offset)
        .ok_or_else(|| bad("string table outside the loaded segments"))?
        as usize;
    let string = |at: u64| -> String {
        let start = strtab_offset + at as usize;
        let raw = bytes.get(start..).unwrap_or(&[]);
        String::from_utf8_lossy(raw.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
    };
    Ok(ElfNeeds {
        interpreter: interp,
        libraries: needed.into_iter().map(string).collect(),
        search_paths: runpaths
            .into_iter()
            .map(string)
            .flat_map(|s| s.split(':').map(str::to_owned).collect::<Vec<_>>())
            .collect(),
    })
}

fn find_program(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let candidate = Path::new(dir).join(name);
        if candidate.exists() {
            return Some(candidate);
        }
    }
    None
}

/// Gathers the programs and their libraries into an OCI layout at `layout` under `tag`:
/// layer 1 holds the libraries, the loader and the shell; layer 2 the other programs, a
/// few files in /etc, and `extra_file` bytes of data at /data/blob (to show that only what
/// is read travels). Returns the programs that made it in.
pub fn build(layout: &Path, tag: &str, extra_file: usize) -> Result<Vec<String>, HostImageError> {
    build_with(layout, tag, extra_file, None, "")
}

/// Like `build`, with one more layer on top (the tests add odd entries this way), and the
/// image's user (`UID[:GID]`, or empty for root).
pub fn build_with(
    layout: &Path,
    tag: &str,
    extra_file: usize,
    extra_layer: Option<LayerBuilder>,
    user: &str,
) -> Result<Vec<String>, HostImageError> {
    let mut base = Gathered::default();
    let mut programs = Gathered::default();
    let mut found = Vec::new();
    let mut queue: VecDeque<PathBuf> = VecDeque::new();
    for name in PROGRAMS {
        let Some(path) = find_program(name) else {
            continue;
        };
        let into = if *name == "sh" {
            &mut base
        } else {
            &mut programs
        };
        let real = into.include(&path)?;
        found.push((*name).to_owned());
        queue.push_back(real);
    }
    if found.is_empty() {
        return Err(HostImageError::NoPrograms(
            PROGRAMS.iter().map(|s| s.to_string()).collect(),
        ));
    }
    // Merged-/usr systems link /bin, /lib, ... into /usr: the image does the same, so that
    // paths like /bin/sh resolve in it as they do here.
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        if let Ok(target) = std::fs::read_link(top) {
            base.links.insert(PathBuf::from(top), target);
        }
    }
    let mut seen = BTreeSet::new();
    while let Some(binary) = queue.pop_front() {
        if !seen.insert(binary.clone()) {
            continue;
        }
        let Ok(ElfNeeds {
            interpreter: interp,
            libraries: needed,
            search_paths: runpaths,
        }) = elf_dependencies(&binary)
        else {
            // Scripts and static binaries need nothing more.
            continue;
        };
        if let Some(interp) = interp {
            queue.push_back(base.include(Path::new(&interp))?);
        }
        for library in needed {
            let dirs = runpaths
                .iter()
                .map(String::as_str)
                .chain(LIBRARY_DIRS.iter().copied());
            if let Some(found) = dirs
                .map(|d| Path::new(d).join(&library))
                .find(|p| p.exists())
            {
                queue.push_back(base.include(&found)?);
            }
        }
    }
    let mut layer1 = LayerBuilder::new();
    add_all(&mut layer1, &base)?;
    layer1.dir("etc", 0o755);
    layer1.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
            .to_vec(),
    );
    layer1.file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    );
    layer1.dir("root", 0o700).dir("tmp", 0o1777);
    let mut layer2 = LayerBuilder::new();
    add_all(&mut layer2, &programs)?;
    layer2.file(
        "etc/motd",
        0o644,
        b"Hello from an image flattened by slapshot and loaded on demand.\n".to_vec(),
    );
    let mut state = 0x5eed_u64;
    let blob: Vec<u8> = (0..extra_file)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    layer2.dir("data", 0o755).file("data/blob", 0o644, blob);
    let config = RuntimeConfig {
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()],
        cmd: vec!["/bin/sh".into()],
        working_dir: "/".into(),
        user: user.into(),
        ..Default::default()
    };
    let mut layers = vec![
        (layer1, LayerCompression::Gzip),
        (layer2, LayerCompression::Zstd),
    ];
    if let Some(extra) = extra_layer {
        layers.push((extra, LayerCompression::Gzip));
    }
    write_oci(layout, tag, &config, &layers).map_err(|error| HostImageError::Io {
        path: layout.to_owned(),
        error,
    })?;
    Ok(found)
}

fn relative(path: &Path) -> String {
    path.strip_prefix("/").unwrap_or(path).display().to_string()
}

fn add_all(layer: &mut LayerBuilder, gathered: &Gathered) -> Result<(), HostImageError> {
    for dir in &gathered.dirs {
        let mode = std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o755);
        layer.dir(&relative(dir), mode);
    }
    for (link, target) in &gathered.links {
        layer.symlink(&relative(link), &target.display().to_string());
    }
    for file in &gathered.files {
        let meta = std::fs::metadata(file).map_err(|error| HostImageError::Io {
            path: file.clone(),
            error,
        })?;
        let bytes = std::fs::read(file).map_err(|error| HostImageError::Io {
            path: file.clone(),
            error,
        })?;
        layer.file(&relative(file), meta.mode() & 0o7777, bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_needs_a_loader_and_libc() {
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let needs = elf_dependencies(&sh).unwrap();
        assert!(needs.interpreter.unwrap().contains("ld-linux"));
        assert!(
            needs.libraries.iter().any(|n| n.starts_with("libc.so")),
            "{:?}",
            needs.libraries
        );
        assert!(elf_dependencies(Path::new("/etc/passwd")).is_err());
    }
}
