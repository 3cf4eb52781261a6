//! What this binary is: the crate version and the git commit it was built from (recorded by `build.rs`). Shown by
//! `flowcraft --version`, logged when a worker or the operator starts, and exported on `/metrics` as
//! `flowcraft_build_info{version, commit} 1`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The crate version (`Cargo.toml`), which is also the chart's `appVersion` and the image tag of a release.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The short git commit of the build, or `unknown` (a build without `.git` and without the Docker build argument).
pub const COMMIT: &str = env!("FLOWCRAFT_GIT_COMMIT");

/// `VERSION (commit COMMIT)`: what `flowcraft --version` prints after the program name.
pub const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FLOWCRAFT_GIT_COMMIT"), ")");

/// Labels of `flowcraft_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

/// Register `flowcraft_build_info{version, commit}`, a gauge that is always 1 (the usual build-info idiom: join
/// it on the labels to see which version each process runs).
pub fn register(registry: &mut Registry) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels { version: VERSION.to_string(), commit: COMMIT.to_string() }).set(1);
    registry.register("flowcraft_build_info", "The version and git commit of this flowcraft binary", info);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_the_crate_version_and_commit_is_set() {
        assert_eq!(VERSION, env!("CARGO_PKG_VERSION"));
        assert!(!COMMIT.is_empty());
        assert!(COMMIT == "unknown" || COMMIT.bytes().all(|b| b.is_ascii_hexdigit()), "{COMMIT}");
        assert_eq!(LONG_VERSION, format!("{VERSION} (commit {COMMIT})"));
    }

    #[test]
    fn build_info_gauge_is_exported() {
        let mut registry = Registry::default();
        register(&mut registry);
        let text = crate::metrics::encode(&registry);
        assert!(text.contains("# TYPE flowcraft_build_info gauge"), "{text}");
        let sample = format!("flowcraft_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1");
        assert!(text.lines().any(|l| l == sample), "no line {sample:?} in:\n{text}");
    }
}
