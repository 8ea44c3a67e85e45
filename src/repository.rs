//! The model repository on disk: which models and versions exist, and where their files are.
//!
//! ```text
//! models/
//!   <name>/model.toml            configuration shared by every version
//!   <name>/model.pt              flat layout: version 1
//!   <name>/<N>/model.pt          versioned layout: version N (a positive integer)
//! ```
//! Names are limited to `[A-Za-z0-9._-]`; every path is checked to stay inside the repository,
//! symbolic links included.

use std::path::{Path, PathBuf};

/// The file that marks a folder as a model.
pub const CONFIG_FILE: &str = "model.toml";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RepositoryError {
    #[error(
        "invalid model name '{0}': use 1-128 characters from [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidName(String),
    #[error("model '{0}' is not in the repository")]
    NotFound(String),
    #[error("model '{0}' resolves outside the repository (symbolic link escape refused)")]
    Escapes(String),
    #[error("cannot read the repository {0}: {1}")]
    Io(String, String),
}

/// One version of a model on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionSource {
    pub version: u64,
    /// Folder holding the version's files (the model folder itself in the flat layout).
    pub dir: PathBuf,
}

/// A model folder: its configuration and the versions present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Ascending by version.
    pub versions: Vec<VersionSource>,
}

#[derive(Debug, Clone)]
pub struct ModelRepository {
    root: PathBuf,
}

/// Is `name` acceptable as a model name (and so as a single path component)?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ModelRepository {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of every folder in the repository that holds a model.toml, sorted.
    pub fn model_names(&self) -> Result<Vec<String>, RepositoryError> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| RepositoryError::Io(self.root.display().to_string(), e.to_string()))?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .filter(|n| self.root.join(n).join(CONFIG_FILE).is_file())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Finds model `name`, refusing names that could leave the repository.
    pub fn find(&self, name: &str) -> Result<ModelSource, RepositoryError> {
        if !valid_name(name) {
            return Err(RepositoryError::InvalidName(name.to_string()));
        }
        let dir = self.root.join(name);
        let config = dir.join(CONFIG_FILE);
        if !config.is_file() {
            return Err(RepositoryError::NotFound(name.to_string()));
        }
        self.check_inside(name, &dir)?;
        self.check_inside(name, &config)?;
        let mut versions: Vec<VersionSource> = std::fs::read_dir(&dir)
            .map_err(|e| RepositoryError::Io(dir.display().to_string(), e.to_string()))?
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                let v: u64 = e.file_name().to_str()?.parse().ok()?;
                (v > 0).then(|| VersionSource {
                    version: v,
                    dir: e.path(),
                })
            })
            .filter(|v| self.check_inside(name, &v.dir).is_ok())
            .collect();
        versions.sort_by_key(|v| v.version);
        if versions.is_empty() {
            versions.push(VersionSource {
                version: 1,
                dir: dir.clone(),
            });
        }
        Ok(ModelSource {
            name: name.to_string(),
            dir,
            config,
            versions,
        })
    }

    /// Refuses a path whose real location is outside the repository's real location.
    pub fn check_inside(&self, name: &str, path: &Path) -> Result<(), RepositoryError> {
        let root = self
            .root
            .canonicalize()
            .map_err(|e| RepositoryError::Io(self.root.display().to_string(), e.to_string()))?;
        match path.canonicalize() {
            Ok(real) if real.starts_with(&root) => Ok(()),
            Ok(_) => Err(RepositoryError::Escapes(name.to_string())),
            // A dangling link or a vanished file: let the loader report the missing file.
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_restricted() {
        assert!(valid_name("image-cnn"));
        assert!(valid_name("v1.2_b"));
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "/etc", "a b", "é"] {
            assert!(!valid_name(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn finds_flat_and_versioned_models_and_refuses_escapes() {
        let root = std::env::temp_dir().join(format!("aiaas-repo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let outside = root.with_extension("outside");
        std::fs::create_dir_all(root.join("flat")).unwrap();
        std::fs::write(root.join("flat/model.toml"), "").unwrap();
        std::fs::create_dir_all(root.join("multi/2")).unwrap();
        std::fs::create_dir_all(root.join("multi/10")).unwrap();
        std::fs::create_dir_all(root.join("multi/notes")).unwrap();
        std::fs::write(root.join("multi/model.toml"), "").unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("model.toml"), "").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sneaky")).unwrap();

        let repo = ModelRepository::new(&root);
        let flat = repo.find("flat").unwrap();
        assert_eq!(
            flat.versions,
            vec![VersionSource {
                version: 1,
                dir: root.join("flat")
            }]
        );
        let multi = repo.find("multi").unwrap();
        let vs: Vec<u64> = multi.versions.iter().map(|v| v.version).collect();
        assert_eq!(vs, vec![2, 10]);
        assert_eq!(
            repo.find("sneaky"),
            Err(RepositoryError::Escapes("sneaky".into()))
        );
        assert_eq!(
            repo.find("../x"),
            Err(RepositoryError::InvalidName("../x".into()))
        );
        assert_eq!(
            repo.find("absent"),
            Err(RepositoryError::NotFound("absent".into()))
        );
        assert_eq!(repo.model_names().unwrap(), vec!["flat", "multi", "sneaky"]);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
