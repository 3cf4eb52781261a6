//! Build script: records the git commit the binary is built from as `FLOWCRAFT_GIT_COMMIT`
//! (read by `src/build_info.rs` for `flowcraft --version`, the start-up log and `flowcraft_build_info`).
//!
//! Order: the `FLOWCRAFT_GIT_COMMIT` environment variable (the Dockerfile passes its `GIT_COMMIT` build argument,
//! since the image's build context has no `.git`), else `git rev-parse HEAD` when this crate is the top of a git
//! work tree, else `unknown` (a crate tarball, a build without git).
//!
//! It also links the `flowcraft` binary with packed relative relocations (DT_RELR) when the toolchain can: see
//! `pack_relative_relocs` and docs/architecture.md (Memory).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLOWCRAFT_GIT_COMMIT");
    let from_env = std::env::var("FLOWCRAFT_GIT_COMMIT").ok().map(|c| c.trim().to_string()).filter(|c| valid(c));
    let commit = from_env.or_else(git_commit).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FLOWCRAFT_GIT_COMMIT={commit}");
    pack_relative_relocs();
}

/// Links the `flowcraft` binary with `-z pack-relative-relocs` (DT_RELR) on linux-gnu when a probe shows the
/// toolchain supports it: the binary's ~2 MB of relative relocations shrink to a few KB, which the dynamic loader
/// reads at every start and a worker kept resident (docs/architecture.md, Memory). The binary then needs glibc
/// 2.36 or later to start (it names the `GLIBC_ABI_DT_RELR` version, so an older glibc refuses it at load time
/// with that name rather than misbehaving); `FLOWCRAFT_NO_RELR=1` builds without it.
///
/// The probe links an empty Rust program with the same `rustc`, target, linker and flags as the crate (the linker
/// is not necessarily the system's `ld`: rustc links x86_64 Linux with its own LLD), keeps the flag only when
/// the output really has a `SHT_RELR` section (a linker that ignores the option with a warning does not count) and,
/// when the target is the host, when the program runs (the host's glibc loads it).
fn pack_relative_relocs() {
    println!("cargo:rerun-if-env-changed=FLOWCRAFT_NO_RELR");
    let env = |key: &str| std::env::var(key).ok();
    if env("FLOWCRAFT_NO_RELR").is_some_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    if env("CARGO_CFG_TARGET_OS").as_deref() != Some("linux") || env("CARGO_CFG_TARGET_ENV").as_deref() != Some("gnu") {
        return;
    }
    const FLAG: &str = "-Wl,-z,pack-relative-relocs";
    let (Some(rustc), Some(target), Some(out_dir)) = (env("RUSTC"), env("TARGET"), env("OUT_DIR")) else {
        return;
    };
    let dir = PathBuf::from(out_dir);
    let source = dir.join("relr_probe.rs");
    let binary = dir.join("relr_probe");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return;
    }
    let mut command = Command::new(rustc);
    command.arg("--target").arg(&target).arg("-C").arg(format!("link-arg={FLAG}")).arg("-o").arg(&binary);
    if let Some(linker) = env("RUSTC_LINKER") {
        command.arg("-C").arg(format!("linker={linker}"));
    }
    if let Some(flags) = env("CARGO_ENCODED_RUSTFLAGS") {
        command.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    command.arg(&source);
    let linked = command.output().is_ok_and(|out| out.status.success());
    let packed = linked && std::fs::read(&binary).is_ok_and(|elf| has_relr_section(&elf));
    let runs = env("HOST") != Some(target) || Command::new(&binary).status().is_ok_and(|s| s.success());
    if packed && runs {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    } else {
        println!("cargo:warning=linking without DT_RELR (-z pack-relative-relocs): the toolchain does not support it");
    }
}

/// Whether a 64-bit little-endian ELF file has a section of type `SHT_RELR` (19). Other ELF classes answer
/// false (the binary is then linked as before).
fn has_relr_section(elf: &[u8]) -> bool {
    const SHT_RELR: u32 = 19;
    let at = |offset: usize, len: usize| elf.get(offset..offset + len);
    let u16_at = |o: usize| at(o, 2).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes);
    let u32_at = |o: usize| at(o, 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let u64_at = |o: usize| at(o, 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    // e_ident: magic, EI_CLASS = 2 (64-bit), EI_DATA = 1 (little-endian).
    if at(0, 6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(shoff), Some(shentsize), Some(shnum)) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c)) else {
        return false;
    };
    let Ok(shoff) = usize::try_from(shoff) else {
        return false;
    };
    (0..usize::from(shnum)).any(|i| u32_at(shoff + i * usize::from(shentsize) + 4) == Some(SHT_RELR))
}

/// A commit id as it may appear in the version line: short hex (or `unknown`), nothing that could break a label.
fn valid(commit: &str) -> bool {
    ((7..=40).contains(&commit.len()) && commit.bytes().all(|b| b.is_ascii_hexdigit())) || commit == "unknown"
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// The short commit of HEAD, when the crate's directory is the top of a git work tree (not a crate unpacked
/// inside some other repository). Also asks cargo to re-run this script when HEAD moves.
fn git_commit() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != manifest_dir.canonicalize().ok()? {
        return None;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| valid(c))?;
    // HEAD, the branch it points to and packed-refs: a commit or a checkout changes one of them. Paths that do not
    // exist are left out (cargo would re-run the script on every build).
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"]), git(&["rev-parse", "--git-path", "packed-refs"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    for path in watched.into_iter().flatten() {
        let path = manifest_dir.join(Path::new(&path));
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}
