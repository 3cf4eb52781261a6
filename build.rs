//! Build script: records the git commit the binary is built from as `FLOWCRAFT_GIT_COMMIT`
//! (read by `src/build_info.rs` for `flowcraft --version`, the start-up log and `flowcraft_build_info`).
//!
//! Order: the `FLOWCRAFT_GIT_COMMIT` environment variable (the Dockerfile passes its `GIT_COMMIT` build argument,
//! since the image's build context has no `.git`), else `git rev-parse HEAD` when this crate is the top of a git
//! work tree, else `unknown` (a crate tarball, a build without git).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLOWCRAFT_GIT_COMMIT");
    let from_env = std::env::var("FLOWCRAFT_GIT_COMMIT").ok().map(|c| c.trim().to_string()).filter(|c| valid(c));
    let commit = from_env.or_else(git_commit).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FLOWCRAFT_GIT_COMMIT={commit}");
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
