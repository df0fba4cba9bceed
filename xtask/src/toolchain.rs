//! The Rust side of set-up: the kernel's target must be in the active
//! toolchain before the kernel builds.
//!
//! rustup installs the targets listed in `rust-toolchain.toml` only when it
//! installs the toolchain itself; a toolchain that was already there (the
//! usual case: stable from rustup) is used as it is. So xtask checks the
//! toolchain's sysroot and adds what is missing, the way `qemu::ensure_qemu`
//! installs QEMU.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The kernel's target (unikernel/kernel/.cargo/config.toml).
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// The `rustc` that builds the kernel: the one next to the `cargo` running
/// us (cargo sets `CARGO`), else whatever `rustc` is in PATH.
fn rustc() -> std::ffi::OsString {
    std::env::var_os("CARGO")
        .map(|c| PathBuf::from(c).with_file_name("rustc"))
        .filter(|r| r.is_file())
        .map(Into::into)
        .unwrap_or_else(|| "rustc".into())
}

/// The sysroot of the toolchain that builds the kernel in `kernel_dir`.
fn sysroot(kernel_dir: &std::path::Path) -> Result<PathBuf> {
    let rustc = rustc();
    let out = Command::new(&rustc)
        .current_dir(kernel_dir)
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("running {} --print sysroot", rustc.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "rustc --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Whether the toolchain at `sysroot` has the standard library for `target`.
fn has_target(sysroot: &std::path::Path, target: &str) -> bool {
    sysroot
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}

/// Makes sure the toolchain that builds the kernel in `kernel_dir` can
/// build for [`KERNEL_TARGET`], installing the target with rustup when it
/// is missing.
pub fn ensure_kernel_target(kernel_dir: &std::path::Path) -> Result<()> {
    let root = sysroot(kernel_dir)?;
    if has_target(&root, KERNEL_TARGET) {
        return Ok(());
    }
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").ok();
    if crate::qemu::find_in_path("rustup").is_none() {
        bail!(
            "the Rust target {KERNEL_TARGET} is missing from {} and rustup is not in PATH: \
             install rustup (https://rustup.rs), then `rustup target add {KERNEL_TARGET}`, \
             or add the target's standard library to this toolchain",
            root.display()
        );
    }
    eprintln!(
        "xtask: Rust target {KERNEL_TARGET} missing from {}; installing it with rustup",
        toolchain.as_deref().unwrap_or("the active toolchain")
    );
    let mut cmd = Command::new("rustup");
    cmd.current_dir(kernel_dir)
        .args(["target", "add", KERNEL_TARGET]);
    if let Some(t) = &toolchain {
        cmd.args(["--toolchain", t]);
    }
    let status = cmd.status().context("running rustup target add")?;
    if !status.success() {
        bail!("`rustup target add {KERNEL_TARGET}` failed ({status})");
    }
    if !has_target(&root, KERNEL_TARGET) {
        bail!(
            "rustup added {KERNEL_TARGET}, but {} still has no library for it",
            root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_target_is_found_and_a_made_up_one_is_not() {
        let root = sysroot(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        let host = std::env::var("TARGET").unwrap_or_else(|_| "x86_64-unknown-linux-gnu".into());
        assert!(has_target(&root, &host), "{} has no {host}", root.display());
        assert!(!has_target(&root, "no-such-target-none"));
    }
}
