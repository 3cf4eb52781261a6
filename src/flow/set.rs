//! A set of validated blueprints, by id, and its one loader: named sources (the files of a directory, the keys of
//! a ConfigMap, the files given to `flowcraft validate`) parsed and validated together, every failure reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::BlueprintError;
use super::blueprint::{Blueprint, is_blueprint_file};
use super::builtin::subflow;
use super::graph::{Graph, Problem};
use super::node::Registry;

/// A blueprint's text and where it comes from (a file path, `ConfigMap ns/name key k`, ...), for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlueprintSource {
    /// Where the text comes from.
    pub name: String,
    /// JSON or YAML.
    pub text: String,
}

impl BlueprintSource {
    /// A named text.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Self { name: name.into(), text: text.into() }
    }
}

/// The validated blueprints a worker, reconciler or pool serves, by id.
#[derive(Debug, Clone, Default)]
pub struct BlueprintSet {
    graphs: BTreeMap<String, Arc<Graph>>,
    sources: HashMap<String, String>,
}

impl BlueprintSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse and validate every source (JSON or YAML) against `registry` (see [`Graph::build`]), keeping the
    /// valid ones. Returns the set and every failure: a source that does not parse or validate, a blueprint
    /// id defined by two sources (the first one is kept), and the blueprints whose `subflow` nodes name a blueprint
    /// the set does not hold or start each other in a cycle (see [`BlueprintSet::check_subflows`]). Each failure
    /// names its source ([`BlueprintError::source_name`]).
    pub fn collect(
        sources: impl IntoIterator<Item = BlueprintSource>,
        registry: Option<&Registry>,
    ) -> (Self, Vec<BlueprintError>) {
        let mut set = Self::new();
        let mut failures = Vec::new();
        for source in sources {
            let built = Blueprint::parse(&source.text, &source.name).and_then(|bp| {
                Graph::build(bp, registry)
                    .map_err(|error| BlueprintError::InSource { origin: source.name.clone(), error: Box::new(error) })
            });
            match built {
                Ok(graph) => {
                    if let Err(duplicate) = set.insert_from(graph, &source.name) {
                        failures.push(duplicate);
                    }
                }
                Err(error) => failures.push(error),
            }
        }
        failures.extend(set.check_subflows());
        (set, failures)
    }

    /// The subflow references across the set (docs/architecture.md, "Subflows"): a `subflow` node naming a
    /// blueprint the set does not hold, and blueprints starting each other as subflows in a cycle (`a → b → a`),
    /// are failures of their blueprints, which are removed from the set.
    fn check_subflows(&mut self) -> Vec<BlueprintError> {
        let mut problems: BTreeMap<String, Vec<Problem>> = BTreeMap::new();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for graph in self.graphs.values() {
            for (node, child) in subflow::subflows(graph) {
                if !self.graphs.contains_key(&child) {
                    let known = self.ids().join(", ");
                    let message =
                        format!("node '{node}' starts blueprint '{child}', which is not in this set ({known})");
                    problems.entry(graph.id().to_string()).or_default().push(Problem::new("unknown-subflow", message));
                }
                edges.entry(graph.id().to_string()).or_default().insert(child);
            }
        }
        while let Some(cycle) = subflow::find_cycle(&edges) {
            let message = format!("blueprints start each other as subflows in a cycle: {}", cycle.join(" -> "));
            for id in cycle.iter().collect::<BTreeSet<_>>() {
                problems.entry(id.clone()).or_default().push(Problem::new("subflow-cycle", message.clone()));
                edges.remove(id.as_str());
            }
        }
        let mut failures = Vec::new();
        for (id, problems) in problems {
            self.graphs.remove(&id);
            let origin = self.sources.remove(&id).unwrap_or_else(|| format!("blueprint '{id}'"));
            let error = Box::new(BlueprintError::Invalid { id, problems });
            failures.push(BlueprintError::InSource { origin, error });
        }
        failures
    }

    /// [`BlueprintSet::collect`], failing with every failure at once ([`BlueprintError::Sources`]).
    pub fn load(
        sources: impl IntoIterator<Item = BlueprintSource>,
        registry: Option<&Registry>,
    ) -> Result<Self, BlueprintError> {
        let (set, failures) = Self::collect(sources, registry);
        if failures.is_empty() { Ok(set) } else { Err(BlueprintError::Sources { failures }) }
    }

    /// Load every blueprint file of a directory ([`read_dir`]); every unreadable or invalid file is reported.
    pub fn load_dir(dir: &Path, registry: Option<&Registry>) -> Result<Self, BlueprintError> {
        let (sources, mut failures) = read_dir(dir)?;
        let (set, invalid) = Self::collect(sources, registry);
        failures.extend(invalid);
        if failures.is_empty() { Ok(set) } else { Err(BlueprintError::Sources { failures }) }
    }

    /// Add a graph (replacing one with the same id).
    pub fn insert(&mut self, graph: Graph) -> Arc<Graph> {
        let g = Arc::new(graph);
        self.sources.remove(g.id());
        self.graphs.insert(g.id().to_string(), g.clone());
        g
    }

    /// Add a graph loaded from `source`, unless its id is taken.
    fn insert_from(&mut self, graph: Graph, source: &str) -> Result<(), BlueprintError> {
        if let Some(first) = self.sources.get(graph.id()) {
            return Err(BlueprintError::DuplicateId {
                id: graph.id().to_string(),
                first: first.clone(),
                second: source.to_string(),
            });
        }
        self.sources.insert(graph.id().to_string(), source.to_string());
        self.graphs.insert(graph.id().to_string(), Arc::new(graph));
        Ok(())
    }

    /// The graph of a blueprint id.
    pub fn get(&self, id: &str) -> Option<Arc<Graph>> {
        self.graphs.get(id).cloned()
    }

    /// The source a blueprint was loaded from (`None` for graphs added with [`BlueprintSet::insert`]).
    pub fn source_of(&self, id: &str) -> Option<&str> {
        self.sources.get(id).map(String::as_str)
    }

    /// The graphs, by id.
    pub fn graphs(&self) -> impl Iterator<Item = &Arc<Graph>> {
        self.graphs.values()
    }

    /// The blueprint ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.graphs.keys().cloned().collect()
    }

    /// Number of blueprints.
    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}

/// The blueprint files of a directory (`.json`, `.yaml`, `.yml`, not hidden, not recursive), sorted by name, as
/// sources; and the files that could not be read. Fails only when the directory itself cannot be read.
pub fn read_dir(dir: &Path) -> Result<(Vec<BlueprintSource>, Vec<BlueprintError>), BlueprintError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| BlueprintError::Io { path: dir.to_path_buf(), message: e.to_string() })?;
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_blueprint_file(p)).collect();
    paths.sort();
    let mut sources = Vec::with_capacity(paths.len());
    let mut failures = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => sources.push(BlueprintSource::new(path.display().to_string(), text)),
            Err(e) => failures.push(BlueprintError::Io { path, message: e.to_string() }),
        }
    }
    Ok((sources, failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "id: a\nnodes: [{id: x, uses: noop}]\n";
    const BAD: &str = "id: bad\nnodes: [{id: x, uses: noop}]\nedges: [{source: x, target: nope}]\n";

    #[test]
    fn every_failure_of_every_source_is_reported_at_once() {
        let sources = [
            BlueprintSource::new("a.yaml", A),
            BlueprintSource::new("bad.yaml", BAD),
            BlueprintSource::new("broken.json", "{ not json"),
            BlueprintSource::new("again.yaml", A),
        ];
        let err = BlueprintSet::load(sources.clone(), Some(&Registry::with_builtins())).unwrap_err();
        let BlueprintError::Sources { failures } = &err else { panic!("{err:?}") };
        let named: Vec<_> = failures.iter().map(|f| f.source_name()).collect();
        assert_eq!(named, [Some("bad.yaml"), Some("broken.json"), Some("again.yaml")]);
        let text = err.to_string();
        for needle in ["bad.yaml", "'nope'", "broken.json", "defined twice: a.yaml and again.yaml"] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
        let (set, failures) = BlueprintSet::collect(sources, None);
        assert_eq!((set.ids(), failures.len()), (vec!["a".to_string()], 3));
        assert_eq!(set.source_of("a"), Some("a.yaml"));
    }

    #[test]
    fn subflows_to_unknown_blueprints_and_cycles_fail_their_blueprints() {
        let sub = |id: &str, child: &str| {
            format!("id: {id}\nnodes: [{{id: s, uses: subflow, params: {{blueprintId: {child}}}}}]\n")
        };
        let sources = [
            BlueprintSource::new("a.yaml", sub("a", "b")),
            BlueprintSource::new("b.yaml", sub("b", "a")),
            BlueprintSource::new("c.yaml", sub("c", "leaf")),
            BlueprintSource::new("leaf.yaml", A.replace("id: a", "id: leaf")),
            BlueprintSource::new("d.yaml", sub("d", "nowhere")),
        ];
        let (set, failures) = BlueprintSet::collect(sources, Some(&Registry::with_builtins()));
        assert_eq!(set.ids(), ["c", "leaf"]);
        let named: Vec<_> = failures.iter().map(|f| f.source_name().unwrap()).collect();
        assert_eq!(named, ["a.yaml", "b.yaml", "d.yaml"]);
        let text: Vec<String> = failures.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("subflow-cycle") && text[0].contains("a -> b -> a"), "{}", text[0]);
        assert!(text[2].contains("unknown-subflow") && text[2].contains("'nowhere'"), "{}", text[2]);
    }

    #[test]
    fn a_directory_is_read_sorted_and_hidden_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yaml"), A.replace("id: a", "id: b")).unwrap();
        std::fs::write(dir.path().join("a.yml"), A).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), BAD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a blueprint").unwrap();
        let set = BlueprintSet::load_dir(dir.path(), None).unwrap();
        assert_eq!(set.ids(), ["a", "b"]);
        assert!(set.source_of("a").unwrap().ends_with("a.yml"));
        let missing = BlueprintSet::load_dir(&dir.path().join("nope"), None).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
