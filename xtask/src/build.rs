//! `cargo xtask build`: the kernel ELF (release).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The repository root (xtask lives in `<root>/xtask`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

pub fn kernel_dir() -> PathBuf {
    repo_root().join("unikernel/kernel")
}

/// Path of the release kernel ELF.
pub fn kernel_elf() -> PathBuf {
    kernel_dir().join("target/x86_64-unknown-none/release/memd-kernel")
}

/// Builds the kernel (its own workspace, target and flags come from
/// unikernel/kernel/.cargo/config.toml) and returns the ELF's path.
pub fn build_kernel() -> Result<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_once(&BUILT, None)
}

/// The release kernel with line tables, for `cargo xtask profile`: the
/// same code, built in its own target directory so the plain build stays.
pub fn build_kernel_with_lines() -> Result<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_once(&BUILT, Some(kernel_dir().join("target/lines")))
}

/// Builds at most once per xtask run (the sources do not change while it
/// runs): `cargo xtask test` boots the kernel from five places.
fn build_once(built: &OnceLock<PathBuf>, target_dir: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(elf) = built.get() {
        return Ok(elf.clone());
    }
    let elf = build_kernel_in(target_dir)?;
    Ok(built.get_or_init(|| elf).clone())
}

fn build_kernel_in(target_dir: Option<PathBuf>) -> Result<PathBuf> {
    crate::toolchain::ensure_kernel_target(&kernel_dir())?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(kernel_dir()).args(["build", "--release"]);
    // Variables set for (or by) the outer cargo would override the kernel's
    // own configuration: its target dir, its rustflags (static relocation).
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(dir) = &target_dir {
        cmd.arg("--target-dir").arg(dir);
        cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
    }
    let status = cmd.status().context("running cargo build for the kernel")?;
    if !status.success() {
        bail!("kernel build failed ({status})");
    }
    let elf = match target_dir {
        Some(dir) => dir.join("x86_64-unknown-none/release/memd-kernel"),
        None => kernel_elf(),
    };
    if !elf.is_file() {
        bail!("kernel build succeeded but {} is missing", elf.display());
    }
    Ok(elf)
}
