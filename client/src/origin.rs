//! The origin: the object store every chunk lives in, behind a trait so that tests and
//! tools can put anything there.
//!
//! Chunks are stored under their name (`chunks/ab/abcdef...`, the two-digit directory
//! keeping local directories small), and writes skip names that exist: names are content
//! hashes, so an existing object already holds the same bytes.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::{
    ObjectStore, ObjectStoreExt, PutPayload,
    aws::{AmazonS3Builder, AmazonS3ConfigKey},
    local::LocalFileSystem,
    path::Path as ObjectPath,
};
use slapshot_core::{CHUNK_SIZE, ChunkName, SealedChunk};

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The cause is printed inline, not returned by `source()` (see `ConfigError`).
    #[error("origin {origin}: {error}")]
    Store {
        origin: String,
        error: object_store::Error,
    },
    #[error("cannot use {url:?} as an origin: {reason}")]
    Url { url: String, reason: String },
    /// Larger than any chunk: refused before a byte of it is read.
    #[error(
        "origin {origin}: chunk {name} is an object of {size} bytes, more than the {limit} a chunk can have"
    )]
    TooLarge {
        origin: String,
        name: ChunkName,
        size: u64,
        limit: usize,
    },
}

/// Where chunks come from when the fleet does not have them.
pub trait Origin: Send + Sync + 'static {
    /// The chunk's bytes, or `None` if the origin does not have it.
    fn get<'a>(&'a self, name: &'a ChunkName) -> BoxFuture<'a, Result<Option<Bytes>, OriginError>>;

    /// Stores a sealed chunk unless its name exists; true if it was written.
    fn put<'a>(&'a self, chunk: &'a SealedChunk) -> BoxFuture<'a, Result<bool, OriginError>>;

    /// A small object beside the chunks (`manifests/<id>`, `refs/<name>`), or `None`.
    fn get_object<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, OriginError>>;

    /// Writes a small object, replacing any previous one atomically.
    fn put_object<'a>(
        &'a self,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), OriginError>>;

    /// The names of the objects directly under `prefix` (`refs`, `manifests`), sorted.
    fn list_objects<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, OriginError>>;

    /// A human-readable location, for logs and errors.
    fn describe(&self) -> String;
}

/// An origin backed by the `object_store` crate: a local directory or S3.
pub struct ObjectStoreOrigin {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    location: String,
}

impl ObjectStoreOrigin {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: ObjectPath, location: String) -> Self {
        Self {
            store,
            prefix,
            location,
        }
    }

    fn path(&self, name: &ChunkName) -> ObjectPath {
        let hex = name.to_hex();
        self.prefix.clone().join("chunks").join(&hex[..2]).join(hex)
    }

    /// The path of a small object; keys are `/`-separated relative names the callers build
    /// from validated parts.
    fn object_path(&self, key: &str) -> ObjectPath {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn error(&self, error: object_store::Error) -> OriginError {
        OriginError::Store {
            origin: self.location.clone(),
            error,
        }
    }
}

impl Origin for ObjectStoreOrigin {
    fn get<'a>(&'a self, name: &'a ChunkName) -> BoxFuture<'a, Result<Option<Bytes>, OriginError>> {
        Box::pin(async move {
            match self.store.get(&self.path(name)).await {
                // The size is known from the metadata (S3's Content-Length): a damaged or
                // hostile origin cannot make the client buffer more than a chunk.
                Ok(result) if result.meta.size > CHUNK_SIZE as u64 => Err(OriginError::TooLarge {
                    origin: self.location.clone(),
                    name: *name,
                    size: result.meta.size,
                    limit: CHUNK_SIZE,
                }),
                Ok(result) => result.bytes().await.map(Some).map_err(|e| self.error(e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error(e)),
            }
        })
    }

    fn put<'a>(&'a self, chunk: &'a SealedChunk) -> BoxFuture<'a, Result<bool, OriginError>> {
        Box::pin(async move {
            let path = self.path(chunk.name());
            match self.store.head(&path).await {
                Ok(_) => return Ok(false),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(e)),
            }
            self.store
                .put(&path, PutPayload::from_bytes(chunk.to_bytes()))
                .await
                .map_err(|e| self.error(e))?;
            Ok(true)
        })
    }

    fn get_object<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, OriginError>> {
        Box::pin(async move {
            match self.store.get(&self.object_path(key)).await {
                Ok(result) => result.bytes().await.map(Some).map_err(|e| self.error(e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error(e)),
            }
        })
    }

    fn put_object<'a>(
        &'a self,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        Box::pin(async move {
            self.store
                .put(&self.object_path(key), PutPayload::from_bytes(bytes))
                .await
                .map(drop)
                .map_err(|e| self.error(e))
        })
    }

    fn list_objects<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, OriginError>> {
        Box::pin(async move {
            let dir = self.object_path(prefix);
            let listing = self.store.list_with_delimiter(Some(&dir)).await;
            let listing = match listing {
                Ok(listing) => listing,
                Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(self.error(e)),
            };
            let mut names: Vec<String> = listing
                .objects
                .iter()
                .filter_map(|meta| meta.location.filename().map(str::to_owned))
                .collect();
            names.sort();
            Ok(names)
        })
    }

    fn describe(&self) -> String {
        self.location.clone()
    }
}

/// Opens an origin from a location:
/// - `s3://bucket/prefix`: S3 or an S3-compatible server, configured by the standard AWS
///   environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
///   and `AWS_ENDPOINT` plus `AWS_ALLOW_HTTP=true` for a plain-HTTP compatible server);
/// - `file:///path` or a plain path: a local directory, created if missing (the command line
///   makes it only for commands that store images: `Settings::origin_to_write`).
pub fn open_origin(location: &str) -> Result<Arc<dyn Origin>, OriginError> {
    open_origin_with(location, &BTreeMap::new())
}

/// Like `open_origin`, with object_store configuration keys (for S3: `aws_endpoint`,
/// `aws_allow_http`, `aws_region`, `aws_access_key_id`, ...) that override the environment.
pub fn open_origin_with(
    location: &str,
    options: &BTreeMap<String, String>,
) -> Result<Arc<dyn Origin>, OriginError> {
    let url_error = |reason: String| OriginError::Url {
        url: location.to_owned(),
        reason,
    };
    if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(url_error("no bucket name".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in options {
            let key: AmazonS3ConfigKey = key
                .parse()
                .map_err(|e: object_store::Error| url_error(e.to_string()))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| url_error(e.to_string()))?;
        let prefix = ObjectPath::parse(prefix.trim_end_matches('/'))
            .map_err(|e| url_error(e.to_string()))?;
        return Ok(Arc::new(ObjectStoreOrigin::new(
            Arc::new(store),
            prefix,
            location.to_owned(),
        )));
    }
    if !options.is_empty() {
        return Err(url_error(
            "origin options apply to s3:// origins only".into(),
        ));
    }
    let Some(dir) = local_dir(location) else {
        return Err(url_error(
            "use a directory, file:///path or s3://bucket/prefix".into(),
        ));
    };
    std::fs::create_dir_all(dir).map_err(|e| url_error(e.to_string()))?;
    let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| url_error(e.to_string()))?;
    Ok(Arc::new(ObjectStoreOrigin::new(
        Arc::new(store),
        ObjectPath::default(),
        dir.display().to_string(),
    )))
}

/// The directory a plain path or `file://` location names; `None` for any other scheme.
pub fn local_dir(location: &str) -> Option<&Path> {
    match location.strip_prefix("file://") {
        Some(path) => Some(Path::new(path)),
        None if !location.contains("://") => Some(Path::new(location)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_origin_stores_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let origin = open_origin(dir.path().to_str().unwrap()).unwrap();
        let bytes = Bytes::from_static(b"sealed chunk bytes");
        let chunk = SealedChunk::assume_sealed(bytes.clone());
        let name = *chunk.name();
        assert_eq!(origin.get(&name).await.unwrap(), None);
        assert!(origin.put(&chunk).await.unwrap());
        assert!(
            !origin.put(&chunk).await.unwrap(),
            "an existing name is skipped"
        );
        assert_eq!(origin.get(&name).await.unwrap(), Some(bytes));
        let hex = name.to_hex();
        assert!(
            dir.path()
                .join("chunks")
                .join(&hex[..2])
                .join(&hex)
                .exists()
        );
    }

    /// An object under a chunk's name that is larger than any chunk (damage, or a hostile
    /// store) is refused from its metadata, before it is read into memory.
    #[tokio::test]
    async fn an_object_larger_than_a_chunk_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let origin = open_origin(dir.path().to_str().unwrap()).unwrap();
        let name = ChunkName([5; 32]);
        let hex = name.to_hex();
        let file = dir.path().join("chunks").join(&hex[..2]).join(&hex);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::File::create(&file)
            .unwrap()
            .set_len(CHUNK_SIZE as u64 + 1)
            .unwrap();
        assert!(matches!(
            origin.get(&name).await,
            Err(OriginError::TooLarge { size, .. }) if size == CHUNK_SIZE as u64 + 1
        ));
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(CHUNK_SIZE as u64)
            .unwrap();
        assert_eq!(
            origin.get(&name).await.unwrap().map(|b| b.len()),
            Some(CHUNK_SIZE)
        );
    }

    #[tokio::test]
    async fn small_objects_are_written_listed_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let origin = open_origin(dir.path().to_str().unwrap()).unwrap();
        assert!(origin.list_objects("refs").await.unwrap().is_empty());
        assert_eq!(origin.get_object("refs/a").await.unwrap(), None);
        origin
            .put_object("refs/b", Bytes::from_static(b"1"))
            .await
            .unwrap();
        origin
            .put_object("refs/a", Bytes::from_static(b"2"))
            .await
            .unwrap();
        origin
            .put_object("refs/a", Bytes::from_static(b"3"))
            .await
            .unwrap();
        origin
            .put_object("manifests/x", Bytes::from_static(b"m"))
            .await
            .unwrap();
        assert_eq!(origin.list_objects("refs").await.unwrap(), ["a", "b"]);
        assert_eq!(
            origin.get_object("refs/a").await.unwrap(),
            Some(Bytes::from_static(b"3"))
        );
    }

    #[test]
    fn unknown_schemes_are_refused() {
        assert!(matches!(
            open_origin("gs://bucket"),
            Err(OriginError::Url { .. })
        ));
        assert!(matches!(
            open_origin("s3:///nobucket"),
            Err(OriginError::Url { .. })
        ));
    }
}
