//! The guest's auth tokens: random, written to files only their owner can
//! read, and handed to QEMU by path (`qemu::QemuConfig::serve`), so they
//! never appear on a command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// A fresh random token (hex, 128 bits) from the OS.
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom for the auth token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Where the two tokens are kept, one file each.
#[derive(Clone, Debug)]
pub struct TokenFiles {
    /// The clients' token (allocation work and views).
    pub client: PathBuf,
    /// The operator's token (also shutdown, fault injection, drop-caches,
    /// stress and check).
    pub operator: PathBuf,
}

/// Writes `contents` to `path`, readable and writable by its owner only:
/// a new file is created with mode 0600, so it is never wider even for a
/// moment; an existing one is truncated and, if its mode is not 0600, set
/// to 0600 before anything is written, and failing that is an error.
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mode = f
        .metadata()
        .with_context(|| format!("reading the mode of {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| {
                format!(
                    "{} has mode {mode:o} and could not be set to 600: not writing a token to it",
                    path.display()
                )
            })?;
    }
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Makes `dir` (and its parents) if missing and sets it to mode 0700: a
/// directory that keeps tokens.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting {} to mode 700", dir.display()))
}

/// A new directory under the system's temporary directory that only this
/// user may enter (mode 0700), removed with its contents when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    pub path: PathBuf,
}

impl PrivateDir {
    /// Creates it; the name has `purpose`, the process id and a random
    /// part, and an existing directory of that name is an error, never
    /// reused.
    pub fn new(purpose: &str) -> Result<PrivateDir> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let path = std::env::temp_dir().join(format!(
            "memd-{purpose}-{}-{}",
            std::process::id(),
            &crate::tokens::random_token()?[..12]
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let dir = PrivateDir { path };
        let mode = std::fs::metadata(&dir.path)?.permissions().mode() & 0o7777;
        if mode != 0o700 {
            std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting {} to mode 700", dir.path.display()))?;
        }
        Ok(dir)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A guest's two tokens and the files that hand them to it.
#[derive(Debug)]
pub struct GuestTokens {
    pub client: String,
    pub operator: String,
    pub files: TokenFiles,
    /// The directory holding the files when it is a temporary one (removed
    /// with it when this is dropped).
    _dir: Option<PrivateDir>,
}

impl GuestTokens {
    /// Fresh random tokens, written (mode 0600) as `token` and
    /// `operator-token` in `dir`, where they stay.
    pub fn write_in(dir: &Path) -> Result<GuestTokens> {
        let client = crate::tokens::random_token()?;
        let operator = crate::tokens::random_token()?;
        let files = TokenFiles {
            client: dir.join("token"),
            operator: dir.join("operator-token"),
        };
        write_secret(&files.client, &format!("{client}\n"))?;
        write_secret(&files.operator, &format!("{operator}\n"))?;
        Ok(GuestTokens {
            client,
            operator,
            files,
            _dir: None,
        })
    }

    /// Fresh random tokens in a new private temporary directory (see
    /// [`PrivateDir`]), for a test or bench guest; the files go when this
    /// is dropped, so it must live as long as the guest may read them.
    pub fn temporary(purpose: &str) -> Result<GuestTokens> {
        let dir = PrivateDir::new(purpose)?;
        let mut tokens = GuestTokens::write_in(&dir.path)?;
        tokens._dir = Some(dir);
        Ok(tokens)
    }

    /// Whether any argument of `cmd` holds either token.
    pub fn appear_in(&self, cmd: &Command) -> bool {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy())
            .any(|a| a.contains(&self.client) || a.contains(&self.operator))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A file's permission bits.
    pub(crate) fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn secrets_are_written_0600_and_wider_files_narrowed() {
        let dir = PrivateDir::new("xtask-unit-secret").unwrap();
        let p = dir.path.join("secret");
        write_secret(&p, "one\n").unwrap();
        assert_eq!(mode(&p), 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&p, "two\n").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
        // A path that cannot be opened for writing is an error, not ignored.
        assert!(write_secret(&dir.path.join("missing/secret"), "x").is_err());
    }
}
