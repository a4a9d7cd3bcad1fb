//! Assembling an agent from the settings: which image, which tiers.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use slapshot_client::{
    FleetClient,
    cli::image::{FlattenArgs, flatten_image},
    images::ImageStore,
    settings::Settings,
};
use slapshot_image::{
    ImageId, KeyFile, KeyProvider, Manifest, SourceRef, digest::Digest, open_source,
};
use tokio::sync::Semaphore;

use crate::{
    disk::DiskCache,
    plain::PlainFiles,
    stats::Stats,
    tiers::{Fetcher, FleetFetcher, OriginFetcher, TierOptions, Tiers},
};

/// Origin fetches at once when there is no fleet (the fleet client has its own limit).
const ORIGIN_FETCHES: usize = 64;

/// The tiers the settings describe: memory and disk of the sizes configured, then the
/// fleet (which falls back to the origin), or the origin alone when there is no fleet.
pub fn build_tiers(
    settings: &Settings,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<Arc<Tiers>> {
    let stats = Arc::new(Stats::default());
    let fetcher: Arc<dyn Fetcher> = match settings.fleet_config() {
        Some(fleet) => Arc::new(FleetFetcher {
            client: FleetClient::new(fleet).context("cannot set up the fleet client")?,
        }),
        None => Arc::new(OriginFetcher {
            origin: settings.origin()?,
            permits: Arc::new(Semaphore::new(ORIGIN_FETCHES)),
        }),
    };
    let disk = if settings.cache.disk.0 > 0 {
        let dir = settings.cache_dir().join("chunks");
        Some(Arc::new(
            DiskCache::open(&dir, settings.cache.disk.0, stats.clone())
                .with_context(|| format!("cannot open the disk cache in {}", dir.display()))?,
        ))
    } else {
        None
    };
    let options = TierOptions {
        memory_bytes: settings.cache.memory.0,
        ..TierOptions::default()
    };
    Ok(Tiers::new(&options, disk, fetcher, stats, runtime))
}

/// The whole-file copies the settings ask for (in the cache directory's `files/`), or
/// none when their budget is 0.
pub fn build_plain_files(
    settings: &Settings,
    stats: &Arc<Stats>,
) -> anyhow::Result<Option<Arc<PlainFiles>>> {
    if settings.cache.files.0 == 0 {
        return Ok(None);
    }
    let dir = settings.cache_dir().join("files");
    let files = PlainFiles::open(&dir, settings.cache.files.0, stats.clone())
        .with_context(|| format!("cannot open the whole-file copies in {}", dir.display()))?;
    Ok(Some(Arc::new(files)))
}

#[derive(Parser)]
struct FlattenDefaults {
    #[command(flatten)]
    args: FlattenArgs,
}

/// An image by name or id from the origin, or a source (`oci:`, `docker-archive:`)
/// flattened first unless the same source was flattened before.
pub async fn resolve_image(
    settings: &Settings,
    reference: &str,
) -> anyhow::Result<(ImageId, Arc<Manifest>)> {
    let key_file = KeyFile::new(settings.key_file());
    if SourceRef::looks_like_source(reference) {
        // Opened before the origin is made (if missing) to flatten it into: a mistyped
        // source makes nothing.
        let source_ref = SourceRef::parse(reference)?;
        let source = tokio::task::spawn_blocking(move || open_source(&source_ref)).await??;
        let store = ImageStore::new(settings.origin_to_write()?);
        // A source is known by its layers and configuration, and by everything else that
        // decides what flattening makes of it (tenant key, salt, layout, format): the id
        // it flattened to is remembered in the origin, so that a second run starts at once.
        let key = key_file.sealing_key()?;
        let mut identity = format!(
            "slapshot source v1\nkey {}\nsalt {}\nlayout {:?}\n",
            Digest::of(&key.id()).hex(),
            settings.salt(),
            slapshot_image::layout::LayoutParams::default(),
        );
        for layer in &source.layers {
            let digest = layer.stored_digest.or(layer.diff_id).map(|d| d.to_string());
            identity.push_str(&digest.unwrap_or_else(|| layer.label.clone()));
            identity.push('\n');
        }
        identity.push_str(&format!("{:?}", source.config));
        let remembered = format!("sources/{}", Digest::of(identity.as_bytes()).hex());
        let known = store
            .origin()
            .get_object(&remembered)
            .await?
            .and_then(|b| ImageId::parse(String::from_utf8_lossy(&b).trim()));
        // Remembered, and still there and readable with this key: use it.
        let known = match known {
            Some(id) => match store.manifest_bytes(&id).await {
                Ok(bytes) if Manifest::decode(&bytes, &key).is_ok() => Some(id),
                _ => None,
            },
            None => None,
        };
        let id = match known {
            Some(id) => id,
            None => {
                eprintln!("flattening {reference} first");
                let defaults = FlattenDefaults::parse_from(["flatten", reference]);
                let report = flatten_image(reference, settings, &defaults.args, true).await?;
                let id = ImageId::parse(&report.image_id).context("flatten returned a bad id")?;
                store
                    .origin()
                    .put_object(&remembered, Bytes::from(format!("{id}\n")))
                    .await?;
                id
            }
        };
        let bytes = store.manifest_bytes(&id).await?;
        let manifest = Manifest::decode(&bytes, &key).with_context(|| format!("image {id}"))?;
        return Ok((id, Arc::new(manifest)));
    }
    let store = ImageStore::new(settings.origin()?);
    let key = key_file.opening_key()?;
    let (id, manifest) = store.load(reference, &key).await?;
    Ok((id, Arc::new(manifest)))
}
