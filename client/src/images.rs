//! Images in the origin: manifests stored under their id, names that point at ids, and the
//! sink that stores a flattening's chunks.
//!
//! Layout in the origin, beside `chunks/`:
//! - `manifests/<image id>`: a sealed manifest; its id is the BLAKE3 of its bytes, checked
//!   on every load;
//! - `refs/<name>`: the id (64 hex digits) a human-readable name points at.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use slapshot_core::SealedChunk;
use slapshot_image::{ImageId, Manifest, TenantKey, manifest::ManifestError};
use tokio::sync::Semaphore;

use crate::origin::{Origin, OriginError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("no image named {name:?} in {origin} (`slapshot images` lists them)")]
    UnknownName { name: String, origin: String },
    #[error("no image {id} in {origin}")]
    UnknownId { id: String, origin: String },
    #[error("{prefix:?} matches several images: {matches}")]
    Ambiguous { prefix: String, matches: String },
    #[error("the manifest stored as {id} in {origin} is damaged: its bytes have another id")]
    Damaged { id: ImageId, origin: String },
    #[error("ref {name:?} in {origin} does not hold an image id")]
    BadRef { name: String, origin: String },
    #[error(
        "{0:?} is not a valid image name: use 1 to 128 of A-Z a-z 0-9 . _ - :, start with a letter or digit, and do not use 8 or more hexadecimal digits alone (they read as an image id)"
    )]
    BadName(String),
    /// The cause is printed inline, not returned by `source()` (see `ConfigError`).
    #[error("image {id}: {error}")]
    Manifest { id: ImageId, error: ManifestError },
}

/// Checks a human-readable image name. Names that could be read as an image id (eight
/// or more hexadecimal digits) are refused, so that a name can never stand in for an id.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let looks_like_id = name.len() >= MIN_ID_PREFIX && name.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = !looks_like_id
        && !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// Shortest prefix of an id that `resolve` accepts.
pub const MIN_ID_PREFIX: usize = 8;

/// The images of one origin.
#[derive(Clone)]
pub struct ImageStore {
    origin: Arc<dyn Origin>,
}

impl ImageStore {
    pub fn new(origin: Arc<dyn Origin>) -> Self {
        Self { origin }
    }

    pub fn origin(&self) -> &Arc<dyn Origin> {
        &self.origin
    }

    /// Stores a sealed manifest under its id.
    pub async fn put_manifest(&self, manifest: Bytes) -> Result<ImageId, ImageError> {
        let id = ImageId::of(&manifest);
        self.origin
            .put_object(&format!("manifests/{id}"), manifest)
            .await?;
        Ok(id)
    }

    /// Points `name` at `id` (replacing what it pointed at).
    pub async fn set_name(&self, name: &str, id: &ImageId) -> Result<(), ImageError> {
        validate_name(name)?;
        self.origin
            .put_object(&format!("refs/{name}"), Bytes::from(format!("{id}\n")))
            .await?;
        Ok(())
    }

    /// Named images, sorted by name.
    pub async fn names(&self) -> Result<Vec<(String, ImageId)>, ImageError> {
        let mut out = Vec::new();
        for name in self.origin.list_objects("refs").await? {
            if validate_name(&name).is_err() {
                continue;
            }
            if let Some(id) = self.read_ref(&name).await? {
                out.push((name, id));
            }
        }
        Ok(out)
    }

    /// The image a name points at, if the name exists.
    pub async fn read_ref(&self, name: &str) -> Result<Option<ImageId>, ImageError> {
        let Some(bytes) = self.origin.get_object(&format!("refs/{name}")).await? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        ImageId::parse(text.trim())
            .map(Some)
            .ok_or_else(|| ImageError::BadRef {
                name: name.to_owned(),
                origin: self.origin.describe(),
            })
    }

    /// An image by id, by name, or by an unambiguous id prefix of at least 8 digits. A
    /// full id is taken as it is: nothing stored in the origin can redirect it.
    pub async fn resolve(&self, reference: &str) -> Result<ImageId, ImageError> {
        if let Some(id) = ImageId::parse(reference) {
            return Ok(id);
        }
        if validate_name(reference).is_ok()
            && let Some(id) = self.read_ref(reference).await?
        {
            return Ok(id);
        }
        let is_prefix = reference.len() >= MIN_ID_PREFIX
            && reference
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if is_prefix {
            let matches: Vec<String> = self
                .origin
                .list_objects("manifests")
                .await?
                .into_iter()
                .filter(|id| id.starts_with(reference))
                .collect();
            match matches.as_slice() {
                [one] => {
                    return ImageId::parse(one).ok_or_else(|| ImageError::UnknownId {
                        id: one.clone(),
                        origin: self.origin.describe(),
                    });
                }
                [] => {}
                many => {
                    return Err(ImageError::Ambiguous {
                        prefix: reference.to_owned(),
                        matches: many.join(", "),
                    });
                }
            }
        }
        Err(ImageError::UnknownName {
            name: reference.to_owned(),
            origin: self.origin.describe(),
        })
    }

    /// A manifest's bytes, checked against its id.
    pub async fn manifest_bytes(&self, id: &ImageId) -> Result<Bytes, ImageError> {
        let bytes = self
            .origin
            .get_object(&format!("manifests/{id}"))
            .await?
            .ok_or_else(|| ImageError::UnknownId {
                id: id.to_string(),
                origin: self.origin.describe(),
            })?;
        if ImageId::of(&bytes) != *id {
            return Err(ImageError::Damaged {
                id: *id,
                origin: self.origin.describe(),
            });
        }
        Ok(bytes)
    }

    /// Resolves a reference and opens its manifest with `key`.
    pub async fn load(
        &self,
        reference: &str,
        key: &TenantKey,
    ) -> Result<(ImageId, Manifest), ImageError> {
        let id = self.resolve(reference).await?;
        let bytes = self.manifest_bytes(&id).await?;
        let manifest =
            Manifest::decode(&bytes, key).map_err(|error| ImageError::Manifest { id, error })?;
        Ok((id, manifest))
    }
}

/// Stores a flattening's chunks in the origin: called from the flattener's threads, it
/// hands each chunk to an upload task on the runtime and returns, holding one of
/// `max_in_flight` permits until the upload is done. That bounds memory (chunks waiting
/// for upload) and lets uploads overlap sealing, which a remote origin needs.
pub struct OriginSink {
    origin: Arc<dyn Origin>,
    runtime: tokio::runtime::Handle,
    permits: Arc<Semaphore>,
    max_in_flight: u32,
    uploaded: Arc<AtomicU64>,
    present: Arc<AtomicU64>,
    bytes_uploaded: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
}

/// What the sink did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkReport {
    pub uploaded: u64,
    pub present: u64,
    pub bytes_uploaded: u64,
}

impl OriginSink {
    pub fn new(
        origin: Arc<dyn Origin>,
        runtime: tokio::runtime::Handle,
        max_in_flight: u32,
    ) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Self {
            origin,
            runtime,
            permits: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight,
            uploaded: Arc::default(),
            present: Arc::default(),
            bytes_uploaded: Arc::default(),
            error: Arc::default(),
        }
    }

    /// Waits for every upload, then reports; the first upload error, if any.
    pub fn finish(&self) -> Result<SinkReport, String> {
        let all = self
            .runtime
            .block_on(self.permits.acquire_many(self.max_in_flight))
            .map_err(|e| e.to_string())?;
        drop(all);
        if let Some(e) = lock(&self.error).clone() {
            return Err(e);
        }
        Ok(SinkReport {
            uploaded: self.uploaded.load(Ordering::Relaxed),
            present: self.present.load(Ordering::Relaxed),
            bytes_uploaded: self.bytes_uploaded.load(Ordering::Relaxed),
        })
    }
}

impl slapshot_image::ChunkSink for OriginSink {
    fn put(&self, chunk: SealedChunk) -> Result<(), String> {
        if let Some(e) = lock(&self.error).clone() {
            return Err(e);
        }
        let permit = self
            .runtime
            .block_on(self.permits.clone().acquire_owned())
            .map_err(|e| e.to_string())?;
        let origin = self.origin.clone();
        let (uploaded, present, bytes, error) = (
            self.uploaded.clone(),
            self.present.clone(),
            self.bytes_uploaded.clone(),
            self.error.clone(),
        );
        // The task owns the chunk and the permit: it finishes even if the flattening
        // fails meanwhile, and `finish` waits for it.
        self.runtime.spawn(async move {
            match origin.put(&chunk).await {
                Ok(true) => {
                    uploaded.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Ok(false) => {
                    present.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&error).get_or_insert_with(|| e.to_string());
                }
            }
            drop(permit);
        });
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_pass_for_ids() {
        assert!(validate_name("python").is_ok());
        assert!(validate_name("python:3.11").is_ok());
        assert!(
            validate_name("abc123").is_ok(),
            "short hex-looking names are fine"
        );
        assert!(validate_name("deadbeef").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(validate_name("bad/name").is_err());
        assert!(validate_name("").is_err());
    }
}
