//! The admin key: taken from config.yaml, or generated once and kept in the
//! data directory.
//!
//! ferrogate ships no key. When every `deployment.admin.admin_key` entry is
//! empty (APISIX's shipped config.yaml), a random 32-character key is made on
//! first start and written to `<data dir>/admin_key` with mode 0600; later
//! starts reuse it. The log says where the file is, never the key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::distr::{Alphanumeric, SampleString};

use admin_api::AdminKey;

use crate::config::GatewayConfig;
use crate::error::Error;

/// Length of a generated key, in characters (APISIX generates 32).
pub const GENERATED_KEY_LEN: usize = 32;
/// File name of the generated key inside the data directory.
pub const KEY_FILE: &str = "admin_key";

/// Creates `dir` (mode 0700) when missing; [`Error::DataDir`] when that
/// fails.
pub fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// The keys the Admin API accepts. Fails only when a key has to be
/// generated and the data directory or the key file cannot be written.
pub fn admin_keys(config: &GatewayConfig) -> Result<Vec<AdminKey>, Error> {
    let mut keys: Vec<AdminKey> = config
        .admin_keys
        .iter()
        .filter(|k| !k.key.is_empty())
        .map(|k| AdminKey {
            name: k.name.clone(),
            key: k.key.clone(),
            role: k.role,
        })
        .collect();
    let wants_admin = !keys.iter().any(|k| k.role == admin_api::Role::Admin);
    if config.admin_key_required && wants_admin {
        let name = config
            .admin_keys
            .iter()
            .find(|k| k.key.is_empty() && k.role == admin_api::Role::Admin)
            .map(|k| k.name.clone())
            .unwrap_or_else(|| "admin".into());
        let key = generated_key(&config.data_dir)?;
        keys.push(AdminKey {
            name,
            key,
            role: admin_api::Role::Admin,
        });
    }
    Ok(keys)
}

/// Reads the generated key, making it on first use.
fn generated_key(data_dir: &Path) -> Result<String, Error> {
    ensure_private_dir(data_dir)?;
    let path = data_dir.join(KEY_FILE);
    if let Ok(text) = fs::read_to_string(&path) {
        let key = text.trim().to_string();
        if !key.is_empty() {
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
                tracing::warn!(path = %path.display(), was = format!("{mode:o}"), "admin key file was readable by others; made it 0600");
            }
            tracing::info!(path = %path.display(), "admin key loaded from the data directory");
            return Ok(key);
        }
    }
    let key = Alphanumeric.sample_string(&mut rand::rng(), GENERATED_KEY_LEN);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| Error::KeyFile {
            path: path.clone(),
            source,
        })?;
    writeln!(file, "{key}")?;
    file.sync_all()?;
    tracing::warn!(
        path = %path.display(),
        "config.yaml has no admin key: generated one and saved it there (mode 0600); send it as X-API-KEY"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config(dir: &Path, yaml: &str) -> GatewayConfig {
        GatewayConfig::from_yaml(yaml, Path::new("conf/config.yaml"), PathBuf::from(dir)).unwrap()
    }

    #[test]
    fn generates_once_and_keeps_it_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), "");
        let first = admin_keys(&c).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key.len(), GENERATED_KEY_LEN);
        let path = dir.path().join("data").join(KEY_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = admin_keys(&c).unwrap();
        assert_eq!(first[0].key, again[0].key);
    }

    #[test]
    fn configured_key_is_used_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), "deployment:\n  admin:\n    admin_key:\n      - name: a\n        key: abcdef\n        role: admin\n");
        let keys = admin_keys(&c).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key, "abcdef");
        assert!(!dir.path().join("data").exists());
    }
}
