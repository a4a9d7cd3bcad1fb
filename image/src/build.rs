//! Writing images: OCI image layouts and `docker save` archives from layers held in memory.
//!
//! `slapshot demo` builds its image with this (no external tools), and the tests build
//! every odd case they need.

use std::{
    io::{self, Write},
    path::Path,
};

use serde_json::json;

use crate::{
    digest::Digest,
    source::RuntimeConfig,
    tar::{EntryHeader, EntryKind, write::TarWriter},
};

/// How a layer's tar is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    fn media_type(self) -> &'static str {
        match self {
            Self::None => "application/vnd.oci.image.layer.v1.tar",
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// One layer: entries in the order they go into the tar.
#[derive(Debug, Clone, Default)]
pub struct LayerBuilder {
    entries: Vec<(EntryHeader, Vec<u8>)>,
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry as given (the tests use this for odd and hostile ones).
    pub fn raw(&mut self, header: EntryHeader, data: Vec<u8>) -> &mut Self {
        self.entries.push((header, data));
        self
    }

    fn header(path: &str, kind: EntryKind, mode: u32) -> EntryHeader {
        EntryHeader {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 1_700_000_000,
            mtime_nanos: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.raw(Self::header(path, EntryKind::Directory, mode), Vec::new())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Self {
        let mut header = Self::header(path, EntryKind::Regular, mode);
        header.size = data.len() as u64;
        self.raw(header, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut header = Self::header(path, EntryKind::Symlink, 0o777);
        header.link = target.as_bytes().to_vec();
        self.raw(header, Vec::new())
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut header = Self::header(path, EntryKind::HardLink, 0o644);
        header.link = target.as_bytes().to_vec();
        self.raw(header, Vec::new())
    }

    /// Hides `path` of the layers below.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&marker, 0o644, Vec::new())
    }

    /// Hides everything the layers below hold in `dir`.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, Vec::new())
    }

    /// The last entry added, to adjust (owner, times, xattrs, device numbers).
    pub fn last(&mut self) -> &mut EntryHeader {
        &mut self.entries.last_mut().expect("an entry was added").0
    }

    /// The uncompressed tar.
    pub fn tar(&self) -> io::Result<Vec<u8>> {
        let mut writer = TarWriter::new(Vec::new());
        for (header, data) in &self.entries {
            writer.append(header, data)?;
        }
        writer.finish()
    }
}

fn compress(tar: &[u8], compression: LayerCompression) -> io::Result<Vec<u8>> {
    match compression {
        LayerCompression::None => Ok(tar.to_vec()),
        LayerCompression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar)?;
            encoder.finish()
        }
        LayerCompression::Zstd => zstd::bulk::compress(tar, 3),
    }
}

fn config_json(config: &RuntimeConfig, diff_ids: &[Digest]) -> Vec<u8> {
    let value = json!({
        "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
        "os": "linux",
        "config": {
            "Env": config.env,
            "Entrypoint": if config.entrypoint.is_empty() { serde_json::Value::Null } else { json!(config.entrypoint) },
            "Cmd": config.cmd,
            "WorkingDir": config.working_dir,
            "User": config.user,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        },
    });
    serde_json::to_vec(&value).expect("JSON serialises")
}

fn write_blob(root: &Path, bytes: &[u8]) -> io::Result<Digest> {
    let digest = Digest::of(bytes);
    let dir = root.join("blobs").join("sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(digest.hex()), bytes)?;
    Ok(digest)
}

/// Writes an image into the OCI layout at `root` (created if missing) under `tag`,
/// replacing an image of the same tag. Returns the image manifest's digest.
pub fn write_oci(
    root: &Path,
    tag: &str,
    config: &RuntimeConfig,
    layers: &[(LayerBuilder, LayerCompression)],
) -> io::Result<Digest> {
    std::fs::create_dir_all(root)?;
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (layer, compression) in layers {
        let tar = layer.tar()?;
        diff_ids.push(Digest::of(&tar));
        let blob = compress(&tar, *compression)?;
        let digest = write_blob(root, &blob)?;
        descriptors.push(json!({
            "mediaType": compression.media_type(),
            "digest": digest.to_string(),
            "size": blob.len(),
        }));
    }
    let config_bytes = config_json(config, &diff_ids);
    let config_digest = write_blob(root, &config_bytes)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": descriptors,
    }))
    .expect("JSON serialises");
    let manifest_digest = write_blob(root, &manifest)?;
    let index_path = root.join("index.json");
    let mut manifests: Vec<serde_json::Value> = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != json!(tag));
    manifests.push(json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest.to_string(),
        "size": manifest.len(),
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }));
    let index = json!({ "schemaVersion": 2, "manifests": manifests });
    std::fs::write(
        &index_path,
        serde_json::to_vec_pretty(&index).expect("JSON serialises"),
    )?;
    Ok(manifest_digest)
}

/// Writes a legacy `docker save` archive (`manifest.json`, `<id>/layer.tar`,
/// `<config digest>.json`) with uncompressed layers.
pub fn write_docker_archive(
    path: &Path,
    config: &RuntimeConfig,
    layers: &[LayerBuilder],
) -> io::Result<()> {
    let mut outer = TarWriter::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let mut diff_ids: Vec<Digest> = Vec::new();
    let mut layer_paths: Vec<String> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let tar = layer.tar()?;
        let digest = Digest::of(&tar);
        // Directories are named by a per-layer id, as docker's v1 ids are; a layer that
        // appears twice is written once, and the second copy is a symlink to the first, as
        // `docker save` does.
        let dir = format!("{i:064x}");
        let name = format!("{dir}/layer.tar");
        outer.append(&member(&format!("{dir}/"), EntryKind::Directory, 0), &[])?;
        match diff_ids.iter().position(|d| *d == digest) {
            Some(first) => {
                let mut link = member(&name, EntryKind::Symlink, 0);
                link.link = format!("../{}", layer_paths[first]).into_bytes();
                outer.append(&link, &[])?;
            }
            None => outer.append(&member(&name, EntryKind::Regular, tar.len() as u64), &tar)?,
        }
        diff_ids.push(digest);
        layer_paths.push(name);
    }
    let config_bytes = config_json(config, &diff_ids);
    let config_name = format!("{}.json", Digest::of(&config_bytes).hex());
    outer.append(
        &member(&config_name, EntryKind::Regular, config_bytes.len() as u64),
        &config_bytes,
    )?;
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": ["slapshot/test:latest"],
        "Layers": layer_paths,
    }]))
    .expect("JSON serialises");
    outer.append(
        &member("manifest.json", EntryKind::Regular, manifest.len() as u64),
        &manifest,
    )?;
    outer.finish()?.flush()
}

fn member(path: &str, kind: EntryKind, size: u64) -> EntryHeader {
    let mut header = LayerBuilder::header(path, kind, 0o644);
    header.size = size;
    header
}
