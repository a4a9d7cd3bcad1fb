//! `slapshot.toml`: the one file that keeps everyday commands short.
//!
//! ```toml
//! origin = "origin"            # a directory (relative to this file), file:///abs, or s3://bucket/prefix
//! origin-options = { aws_endpoint = "http://127.0.0.1:9000", aws_allow_http = "true" }
//! key-file = "tenant.key"      # the tenant key (created 0600 by the first flatten)
//! salt = "2026-11"             # convergent-encryption salt for new chunks
//!
//! [cache]                      # the worker's own tiers (slapshot mount / run)
//! dir = "cache"
//! memory = "512MiB"
//! disk = "8GiB"
//!
//! [fleet]                      # optional: the cache fleet, as in a fleet file
//! data-shards = 4
//! total-shards = 5
//! [[fleet.nodes]]
//! id = "node-0"
//! addr = "127.0.0.1:7000"
//! ```
//!
//! Found through `--config`, then `$SLAPSHOT_CONFIG`, then `./slapshot.toml`; without one,
//! every setting has a default but the origin, which `--origin` then gives. Command-line
//! flags override the file.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use slapshot_core::ByteSize;

use crate::{
    FleetConfig,
    config::ConfigError,
    origin::{Origin, open_origin_with},
};

pub const ENV_CONFIG: &str = "SLAPSHOT_CONFIG";
pub const FILE_NAME: &str = "slapshot.toml";
/// The salt when none is configured. Everyone who keeps it dedups with everyone else who
/// does; set your own to narrow the blast radius of a bad chunk (see BRIEF.md).
pub const DEFAULT_SALT: &str = "slapshot-default-salt";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub origin_options: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    #[serde(default)]
    pub cache: CacheSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
    /// The file these settings came from, if any (not part of the file).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct CacheSettings {
    /// The worker's disk tier, shared by every image [default: ~/.cache/slapshot].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Decrypted chunks kept in memory.
    pub memory: ByteSize,
    /// Sealed chunks kept on disk.
    pub disk: ByteSize,
    /// Whole files kept decrypted on disk (beside the disk tier), which warm reads use
    /// through FUSE passthrough at local-disk speed; 0 turns them off.
    pub files: ByteSize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            dir: None,
            memory: ByteSize(256 << 20),
            disk: ByteSize(4 << 30),
            files: ByteSize(1 << 30),
        }
    }
}

/// Flags every image command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SettingsArgs {
    /// Settings file [default: $SLAPSHOT_CONFIG, then ./slapshot.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Origin: a directory or s3://bucket/prefix (overrides the settings file).
    #[arg(long, value_name = "LOCATION")]
    pub origin: Option<String>,
    /// Tenant key file (overrides the settings file) [default: ~/.config/slapshot/tenant.key].
    /// `flatten` creates it (0600) if missing; the other commands need it to exist.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

impl Settings {
    /// Reads a settings file; relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut settings: Self = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(origin) = &settings.origin {
            settings.origin = Some(relative_location(base, origin));
        }
        if let Some(key) = &settings.key_file {
            settings.key_file = Some(base.join(key));
        }
        if let Some(dir) = &settings.cache.dir {
            settings.cache.dir = Some(base.join(dir));
        }
        if let Some(fleet) = &mut settings.fleet {
            if let Some(token) = &fleet.token_file
                && token.is_relative()
            {
                fleet.token_file = Some(base.join(token));
            }
            fleet.validate()?;
        }
        settings.source = Some(path.to_owned());
        Ok(settings)
    }

    /// The settings for a command: the file it names (or the default places), with its
    /// flags applied.
    pub fn resolve(args: &SettingsArgs) -> Result<Self, ConfigError> {
        let path = match (&args.config, std::env::var_os(ENV_CONFIG)) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(env)) if !env.is_empty() => Some(PathBuf::from(env)),
            _ => Some(PathBuf::from(FILE_NAME)).filter(|p| p.exists()),
        };
        let mut settings = match path {
            Some(path) => Self::load(&path)?,
            None => Self::default(),
        };
        if let Some(origin) = &args.origin {
            settings.origin = Some(origin.clone());
        }
        if let Some(key) = &args.key_file {
            settings.key_file = Some(key.clone());
        }
        Ok(settings)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("settings serialise")
    }

    /// The origin, to read images from: a local directory must exist (a mistyped path is
    /// an error, not an empty origin made on the spot).
    pub fn origin(&self) -> anyhow::Result<std::sync::Arc<dyn Origin>> {
        let location = self.origin_location()?;
        if let Some(dir) = crate::origin::local_dir(location) {
            let local = dir.display();
            match std::fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => anyhow::bail!("origin {local} is not a directory"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                    "origin {local} does not exist (`slapshot flatten` creates it with the first image)"
                ),
                Err(e) => anyhow::bail!("origin {local}: {e}"),
            }
        }
        Ok(open_origin_with(location, &self.origin_options)?)
    }

    /// The origin, to store images in: a local directory is created if missing.
    pub fn origin_to_write(&self) -> anyhow::Result<std::sync::Arc<dyn Origin>> {
        Ok(open_origin_with(
            self.origin_location()?,
            &self.origin_options,
        )?)
    }

    fn origin_location(&self) -> anyhow::Result<&str> {
        self.origin.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "no origin: pass --origin DIR|s3://bucket/prefix, or name one in slapshot.toml \
                 (--config, ${ENV_CONFIG}, or ./slapshot.toml)"
            )
        })
    }

    /// The tenant key file: from the settings, else ~/.config/slapshot/tenant.key.
    pub fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| config_home().join("slapshot").join("tenant.key"))
    }

    pub fn salt(&self) -> &str {
        self.salt.as_deref().unwrap_or(DEFAULT_SALT)
    }

    /// The disk tier's directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.dir.clone().unwrap_or_else(|| {
            match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
                Some(dir) => PathBuf::from(dir).join("slapshot"),
                None => home().join(".cache").join("slapshot"),
            }
        })
    }

    /// The fleet, with this file's origin as its origin.
    pub fn fleet_config(&self) -> Option<FleetConfig> {
        self.fleet.clone().map(|mut fleet| {
            fleet.origin = self.origin.clone();
            fleet.origin_options = self.origin_options.clone();
            fleet
        })
    }
}

fn relative_location(base: &Path, location: &str) -> String {
    if location.contains("://") || Path::new(location).is_absolute() {
        location.to_owned()
    } else {
        base.join(location).display().to_string()
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn config_home() -> PathBuf {
    match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => home().join(".config"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("slapshot.toml");
        std::fs::write(
            &file,
            "origin = \"o\"\nkey-file = \"k\"\nsalt = \"s\"\n[cache]\ndir = \"c\"\nmemory = \"1MiB\"\ndisk = \"2MiB\"\n",
        )
        .unwrap();
        let args = SettingsArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(
            s.origin.as_deref(),
            Some(dir.path().join("o").to_str().unwrap())
        );
        assert_eq!(s.key_file(), dir.path().join("k"));
        assert_eq!(s.cache_dir(), dir.path().join("c"));
        assert_eq!(s.salt(), "s");
        assert_eq!(s.cache.memory, ByteSize(1 << 20));
        let args = SettingsArgs {
            config: Some(file),
            origin: Some("s3://b/p".into()),
            key_file: Some("/x".into()),
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.origin.as_deref(), Some("s3://b/p"));
        assert_eq!(s.key_file(), PathBuf::from("/x"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("slapshot.toml");
        std::fs::write(&file, "orign = \"typo\"\n").unwrap();
        let err = Settings::load(&file).unwrap_err();
        assert!(err.to_string().contains("orign"), "{err}");
    }
}
