//! Where images come from: OCI image layouts (`oci:PATH[:TAG]`, as skopeo, umoci and
//! buildah write them) and `docker save` archives (`docker-archive:PATH`).
//!
//! A source resolves to the image's runtime configuration and its layers in order. Every
//! JSON blob is checked against its digest before it is parsed; a layer is opened as a
//! stream that checks its digest at the end (see [`crate::layer`], which does not let a
//! layer into the tree before that check has passed).

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
};

use serde::Deserialize;

use crate::{
    digest::{Digest, VerifyingReader},
    tar::{EntryKind, TarReader},
};

/// JSON blobs (index, manifest, config) larger than this are refused: real ones are a few
/// KiB, and they are read whole into memory.
const MAX_JSON_BLOB: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0:?} is not an image reference: use oci:PATH[:TAG] or docker-archive:PATH")]
    BadReference(String),
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{what} in {path}: {message}")]
    Invalid {
        path: PathBuf,
        what: String,
        message: String,
    },
    #[error("{path}: {message}")]
    NotFound { path: PathBuf, message: String },
}

/// An image reference on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    Oci { path: PathBuf, tag: Option<String> },
    DockerArchive { path: PathBuf },
}

impl SourceRef {
    /// Parses `oci:PATH[:TAG]` or `docker-archive:PATH`. A colon in PATH is allowed when
    /// what follows the last colon contains a slash (it is then part of the path).
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        if let Some(rest) = text.strip_prefix("oci:") {
            let (path, tag) = match rest.rsplit_once(':') {
                Some((path, tag)) if !tag.contains('/') && !path.is_empty() => {
                    (path, (!tag.is_empty()).then(|| tag.to_owned()))
                }
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(SourceError::BadReference(text.to_owned()));
            }
            return Ok(Self::Oci {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(path) = text.strip_prefix("docker-archive:") {
            if path.is_empty() {
                return Err(SourceError::BadReference(text.to_owned()));
            }
            return Ok(Self::DockerArchive {
                path: PathBuf::from(path),
            });
        }
        Err(SourceError::BadReference(text.to_owned()))
    }

    /// True if `text` names a source rather than an image already in the origin.
    pub fn looks_like_source(text: &str) -> bool {
        text.starts_with("oci:") || text.starts_with("docker-archive:")
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Oci { path, tag: Some(t) } => write!(f, "oci:{}:{t}", path.display()),
            Self::Oci { path, tag: None } => write!(f, "oci:{}", path.display()),
            Self::DockerArchive { path } => write!(f, "docker-archive:{}", path.display()),
        }
    }
}

/// What a container needs to know to start a program from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// Where a layer's bytes are: a byte range of a file.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// For error messages: `layer 2 (sha256:...)`.
    pub label: String,
    pub file: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// The digest of the bytes as stored, when the source names one (OCI layouts, new
    /// docker archives).
    pub stored_digest: Option<Digest>,
    /// The digest of the uncompressed tar (the config's diff_id), checked on the
    /// uncompressed stream.
    pub diff_id: Option<Digest>,
}

impl LayerBlob {
    /// The layer's stored bytes, verified against `stored_digest` at the end of the
    /// stream, and the flag that says the check passed. Without a stored digest there is
    /// no flag, and the caller must check `diff_id` on the uncompressed stream.
    pub fn open(&self) -> Result<OpenedBlob, SourceError> {
        let io_err = |error| SourceError::Io {
            path: self.file.clone(),
            error,
        };
        let mut file = File::open(&self.file).map_err(io_err)?;
        file.seek(SeekFrom::Start(self.offset)).map_err(io_err)?;
        let range = io::BufReader::with_capacity(1 << 20, file.take(self.len));
        Ok(match self.stored_digest {
            Some(digest) => {
                let reader =
                    VerifyingReader::new(range, digest, Some(self.len), self.label.clone());
                let flag = reader.verified_flag();
                (Box::new(reader), Some(flag))
            }
            None => (Box::new(range), None),
        })
    }
}

/// A layer's stored bytes, and the flag its digest check sets when it passes.
pub type OpenedBlob = (Box<dyn Read + Send>, Option<Arc<AtomicBool>>);

/// A resolved image: configuration and layers, bottom first.
#[derive(Debug, Clone)]
pub struct ImageSource {
    pub reference: SourceRef,
    pub config: RuntimeConfig,
    pub layers: Vec<LayerBlob>,
}

/// Resolves a reference to its configuration and layers.
pub fn open_source(reference: &SourceRef) -> Result<ImageSource, SourceError> {
    match reference {
        SourceRef::Oci { path, tag } => open_oci(reference, path, tag.as_deref()),
        SourceRef::DockerArchive { path } => open_docker_archive(reference, path),
    }
}

// --- OCI JSON, the fields we use -------------------------------------------------------

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageManifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn invalid(path: &Path, what: impl Into<String>, message: impl ToString) -> SourceError {
    SourceError::Invalid {
        path: path.to_owned(),
        what: what.into(),
        message: message.to_string(),
    }
}

fn parse_digest(path: &Path, what: &str, text: &str) -> Result<Digest, SourceError> {
    text.parse().map_err(|e| invalid(path, what, e))
}

fn runtime_config(config: ConfigFile) -> (RuntimeConfig, Vec<String>) {
    let c = config.config.unwrap_or_default();
    (
        RuntimeConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        },
        config.rootfs.unwrap_or_default().diff_ids,
    )
}

/// Layer media types we can read: plain, gzip and zstd tars (OCI and Docker names,
/// non-distributable variants included). The compression itself is detected from the
/// bytes.
fn is_layer_type(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

fn open_oci(
    reference: &SourceRef,
    root: &Path,
    tag: Option<&str>,
) -> Result<ImageSource, SourceError> {
    let layout_file = root.join("oci-layout");
    if !layout_file.exists() {
        return Err(SourceError::NotFound {
            path: root.to_owned(),
            message: "not an OCI image layout (no oci-layout file)".into(),
        });
    }
    let index_path = root.join("index.json");
    let index: Index = read_json_file(&index_path)?;
    let candidates: Vec<&Descriptor> = match tag {
        Some(tag) => index
            .manifests
            .iter()
            .filter(|d| d.annotations.get(REF_NAME).is_some_and(|t| t == tag))
            .collect(),
        None => index.manifests.iter().collect(),
    };
    let descriptor = match candidates.as_slice() {
        [one] => *one,
        [] => {
            let tags: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            return Err(SourceError::NotFound {
                path: root.to_owned(),
                message: match tag {
                    Some(tag) => format!("no image tagged {tag:?} (tags: {})", tags.join(", ")),
                    None => "the layout holds no image".into(),
                },
            });
        }
        _ => {
            return Err(SourceError::NotFound {
                path: root.to_owned(),
                message: "the layout holds several images: name one with oci:PATH:TAG".into(),
            });
        }
    };
    let manifest = resolve_manifest(root, descriptor, 0)?;
    let config_blob = read_blob(root, &manifest.config)?;
    let config: ConfigFile =
        serde_json::from_slice(&config_blob).map_err(|e| invalid(root, "the image config", e))?;
    let (config, diff_ids) = runtime_config(config);
    if diff_ids.len() != manifest.layers.len() {
        return Err(invalid(
            root,
            "the image config",
            format!(
                "lists {} diff_ids for the manifest's {} layers",
                diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, (layer, diff_id)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
        if !is_layer_type(&layer.media_type) {
            return Err(invalid(
                root,
                format!("layer {i}"),
                format!("unsupported media type {:?}", layer.media_type),
            ));
        }
        let digest = parse_digest(root, &format!("layer {i}"), &layer.digest)?;
        let file = blob_path(root, &digest);
        let len = std::fs::metadata(&file)
            .map_err(|error| SourceError::Io {
                path: file.clone(),
                error,
            })?
            .len();
        if len != layer.size {
            return Err(invalid(
                &file,
                format!("layer {i}"),
                format!("{len} bytes, the manifest says {}", layer.size),
            ));
        }
        layers.push(LayerBlob {
            label: format!("layer {i} ({digest})"),
            file,
            offset: 0,
            len,
            stored_digest: Some(digest),
            diff_id: Some(parse_digest(
                root,
                &format!("layer {i}'s diff_id"),
                diff_id,
            )?),
        });
    }
    Ok(ImageSource {
        reference: reference.clone(),
        config,
        layers,
    })
}

/// Follows image indexes down to one image manifest for this machine's platform.
fn resolve_manifest(
    root: &Path,
    descriptor: &Descriptor,
    depth: usize,
) -> Result<ImageManifest, SourceError> {
    if depth > 4 {
        return Err(invalid(root, "the index", "indexes nested too deeply"));
    }
    let blob = read_blob(root, descriptor)?;
    if INDEX_TYPES.contains(&descriptor.media_type.as_str()) {
        let index: Index =
            serde_json::from_slice(&blob).map_err(|e| invalid(root, "an image index", e))?;
        let arch = host_architecture();
        let chosen = index
            .manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| SourceError::NotFound {
                path: root.to_owned(),
                message: format!("the image index has no linux/{arch} image"),
            })?;
        return resolve_manifest(root, chosen, depth + 1);
    }
    let manifest: ImageManifest =
        serde_json::from_slice(&blob).map_err(|e| invalid(root, "an image manifest", e))?;
    if INDEX_TYPES.contains(&manifest.media_type.as_str()) {
        return Err(invalid(
            root,
            "an image manifest",
            "is an index without saying so",
        ));
    }
    Ok(manifest)
}

/// The OCI name of this machine's architecture.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs").join("sha256").join(digest.hex())
}

/// Reads a small blob whole and checks its size and digest.
fn read_blob(root: &Path, descriptor: &Descriptor) -> Result<Vec<u8>, SourceError> {
    let digest = parse_digest(root, "a descriptor", &descriptor.digest)?;
    if descriptor.size > MAX_JSON_BLOB {
        return Err(invalid(
            root,
            digest.to_string(),
            format!("{} bytes is too large for a JSON blob", descriptor.size),
        ));
    }
    let path = blob_path(root, &digest);
    let bytes = std::fs::read(&path).map_err(|error| SourceError::Io {
        path: path.clone(),
        error,
    })?;
    if bytes.len() as u64 != descriptor.size || Digest::of(&bytes) != digest {
        return Err(invalid(
            &path,
            "a blob",
            format!(
                "does not match its descriptor ({digest}, {} bytes)",
                descriptor.size
            ),
        ));
    }
    Ok(bytes)
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SourceError> {
    let file = File::open(path).map_err(|error| SourceError::Io {
        path: path.to_owned(),
        error,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON_BLOB + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| SourceError::Io {
            path: path.to_owned(),
            error,
        })?;
    if bytes.len() as u64 > MAX_JSON_BLOB {
        return Err(invalid(path, "a JSON file", "too large"));
    }
    serde_json::from_slice(&bytes).map_err(|e| invalid(path, "JSON", e))
}

// --- docker save archives ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A member of the outer archive: where its bytes are.
struct Member {
    offset: u64,
    len: u64,
}

fn open_docker_archive(reference: &SourceRef, path: &Path) -> Result<ImageSource, SourceError> {
    let io_err = |error| SourceError::Io {
        path: path.to_owned(),
        error,
    };
    // Index the archive's members. `docker save` writes an uncompressed tar, so each
    // member can be read in place by its offset.
    let file = File::open(path).map_err(io_err)?;
    let mut reader = TarReader::new(io::BufReader::with_capacity(1 << 16, file));
    let mut members = HashMap::new();
    // `docker save` writes a layer that appears twice as a symlink to its first copy.
    let mut links: HashMap<String, String> = HashMap::new();
    while let Some(header) = reader
        .next_entry()
        .map_err(|e| invalid(path, "the archive", e))?
    {
        let name = normalize_member(&String::from_utf8_lossy(&header.path));
        match header.kind {
            EntryKind::Regular => {
                members.insert(
                    name,
                    Member {
                        offset: reader.offset(),
                        len: header.size,
                    },
                );
            }
            EntryKind::Symlink => {
                let target = String::from_utf8_lossy(&header.link).into_owned();
                let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                links.insert(name.clone(), normalize_member(&format!("{dir}/{target}")));
            }
            EntryKind::HardLink => {
                links.insert(
                    name,
                    normalize_member(&String::from_utf8_lossy(&header.link)),
                );
            }
            _ => {}
        }
    }
    let find = |name: &str| -> Option<&Member> {
        let mut name = normalize_member(name);
        // A few hops at most; a loop, or a link that leaves the archive, finds nothing.
        for _ in 0..8 {
            if let Some(member) = members.get(&name) {
                return Some(member);
            }
            name = links.get(&name)?.clone();
        }
        None
    };
    let read_member = |name: &str| -> Result<Vec<u8>, SourceError> {
        let member = find(name).ok_or_else(|| SourceError::NotFound {
            path: path.to_owned(),
            message: format!("the archive has no {name}"),
        })?;
        if member.len > MAX_JSON_BLOB {
            return Err(invalid(path, name, "too large for a JSON file"));
        }
        let mut file = File::open(path).map_err(io_err)?;
        file.seek(SeekFrom::Start(member.offset)).map_err(io_err)?;
        let mut bytes = vec![0u8; member.len as usize];
        file.read_exact(&mut bytes).map_err(io_err)?;
        Ok(bytes)
    };
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&read_member("manifest.json")?)
        .map_err(|e| invalid(path, "manifest.json", e))?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err(invalid(path, "manifest.json", "lists no image")),
        _ => {
            return Err(invalid(
                path,
                "manifest.json",
                "lists several images; save one image per archive",
            ));
        }
    };
    let _ = &entry.repo_tags;
    let config_bytes = read_member(&entry.config)?;
    // The config is named by its digest: `<hex>.json` (legacy) or `blobs/sha256/<hex>`.
    if let Some(expected) = digest_in_name(&entry.config)
        && Digest::of(&config_bytes) != expected
    {
        return Err(invalid(
            path,
            entry.config.clone(),
            "does not match the digest in its name",
        ));
    }
    let config: ConfigFile =
        serde_json::from_slice(&config_bytes).map_err(|e| invalid(path, "the image config", e))?;
    let (config, diff_ids) = runtime_config(config);
    if diff_ids.len() != entry.layers.len() {
        return Err(invalid(
            path,
            "the image config",
            format!(
                "lists {} diff_ids for {} layers",
                diff_ids.len(),
                entry.layers.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(entry.layers.len());
    for (i, (name, diff_id)) in entry.layers.iter().zip(&diff_ids).enumerate() {
        let member = find(name).ok_or_else(|| SourceError::NotFound {
            path: path.to_owned(),
            message: format!("the archive has no {name} (layer {i})"),
        })?;
        let diff_id = parse_digest(path, &format!("layer {i}'s diff_id"), diff_id)?;
        let stored_digest = name
            .strip_prefix("blobs/sha256/")
            .and_then(|_| digest_in_name(name));
        layers.push(LayerBlob {
            label: format!("layer {i} ({name})"),
            file: path.to_owned(),
            offset: member.offset,
            len: member.len,
            stored_digest,
            diff_id: Some(diff_id),
        });
    }
    Ok(ImageSource {
        reference: reference.clone(),
        config,
        layers,
    })
}

/// A member's path without `./`, `.` and `..` (which stop at the archive's root).
fn normalize_member(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// The digest a member's name carries: `blobs/sha256/<hex>` or `<hex>.json`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let base = name.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    format!("sha256:{hex}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        assert_eq!(
            SourceRef::parse("oci:/a/b:latest").unwrap(),
            SourceRef::Oci {
                path: "/a/b".into(),
                tag: Some("latest".into())
            }
        );
        assert_eq!(
            SourceRef::parse("oci:/a/b").unwrap(),
            SourceRef::Oci {
                path: "/a/b".into(),
                tag: None
            }
        );
        assert_eq!(
            SourceRef::parse("oci:/x:y/z").unwrap(),
            SourceRef::Oci {
                path: "/x:y/z".into(),
                tag: None
            }
        );
        assert_eq!(
            SourceRef::parse("docker-archive:img.tar").unwrap(),
            SourceRef::DockerArchive {
                path: "img.tar".into()
            }
        );
        assert!(SourceRef::parse("docker://busybox").is_err());
        assert!(SourceRef::parse("oci:").is_err());
    }

    #[test]
    fn member_names_normalize() {
        assert_eq!(normalize_member("./a/b/../c"), "a/c");
        assert_eq!(normalize_member("abc/../def/layer.tar"), "def/layer.tar");
        assert_eq!(normalize_member("../../x"), "x");
    }

    #[test]
    fn digests_in_member_names() {
        let hex = "a".repeat(64);
        assert!(digest_in_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_in_name(&format!("{hex}.json")).is_some());
        assert!(digest_in_name("abc/layer.tar").is_none());
    }
}
