//! Content fingerprints of model folders, so that a poll reloads a model only when its files'
//! contents change (a touched but unchanged file is not a change).

use std::collections::HashMap;
use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// What identifies a file version cheaply: size, mtime, ctime (which no one can set back) and
/// inode (a replaced file is a new inode).
type Stamp = (u64, Option<SystemTime>, i64, i64, u64);

/// Remembers each file's hash by its [`Stamp`], re-reading only files that look different.
#[derive(Default)]
pub struct Fingerprints {
    cache: Mutex<HashMap<PathBuf, (Stamp, u64)>>,
}

impl Fingerprints {
    /// A hash of the contents (and relative names) of `config` and of every regular file in
    /// `dir`, not descending into numbered version folders.
    pub fn of(&self, config: &Path, dir: &Path) -> std::io::Result<u64> {
        let mut files = vec![config.to_path_buf()];
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.is_file() && path != config {
                files.push(path);
            }
        }
        files.sort();
        let mut total = std::collections::hash_map::DefaultHasher::new();
        for f in &files {
            total.write(
                f.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            total.write_u64(self.file_hash(f)?);
        }
        Ok(total.finish())
    }

    fn file_hash(&self, path: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        let stamp: Stamp = (
            meta.len(),
            meta.modified().ok(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.ino(),
        );
        if let Some(&(seen, hash)) = self.cache.lock().expect("fingerprint cache").get(path) {
            if seen == stamp {
                return Ok(hash);
            }
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
        }
        let hash = hasher.finish();
        self.cache
            .lock()
            .expect("fingerprint cache")
            .insert(path.to_path_buf(), (stamp, hash));
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_with_content_not_with_mtime() {
        let dir = std::env::temp_dir().join(format!("aiaas-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("2")).unwrap();
        let config = dir.join("model.toml");
        std::fs::write(&config, "kind = 'regressor'").unwrap();
        std::fs::write(dir.join("model.pt"), b"weights").unwrap();
        let fp = Fingerprints::default();
        let a = fp.of(&config, &dir).unwrap();
        // same bytes rewritten (new mtime): same fingerprint
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("model.pt"), b"weights").unwrap();
        assert_eq!(fp.of(&config, &dir).unwrap(), a);
        // a file in a version folder is not part of the model folder's fingerprint
        std::fs::write(dir.join("2/model.pt"), b"other").unwrap();
        assert_eq!(fp.of(&config, &dir).unwrap(), a);
        // same size, different bytes
        std::fs::write(dir.join("model.pt"), b"weightz").unwrap();
        assert_ne!(fp.of(&config, &dir).unwrap(), a);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
