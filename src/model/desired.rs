//! What the node should hold: one `DesiredImage` per image, with the projects that want it and the pull
//! secrets to pull it with. Config and the cluster source build these; the prewarmer follows them.

use std::fmt;
use std::path::PathBuf;

use crate::credentials::Keyring;
use crate::reference::ImageRef;

/// One image the node should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredImage {
    pub image: ImageRef,
    /// A `.dockerconfigjson` or `.dockercfg` file, read at every pull so rotated secrets apply.
    pub pull_secret: Option<PathBuf>,
    /// Pull secrets read from the cluster (each project's `runnerImagePullSecret`), tried after the file's.
    pub cluster_secrets: Vec<ClusterSecret>,
    /// The projects (namespaces) that want it, named in findings.
    pub projects: Projects,
}

impl DesiredImage {
    /// An image with only a reference, an optional secret file and the project that wants it.
    pub fn new(image: ImageRef, pull_secret: Option<PathBuf>, project: Option<String>) -> Self {
        Self {
            image,
            pull_secret,
            cluster_secrets: Vec::new(),
            projects: Projects::new(project),
        }
    }
}

/// A Kubernetes Secret's identity (never its content).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl SecretRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// `namespace/name`, as logs and messages name it.
impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A parsed pull secret from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSecret {
    pub id: SecretRef,
    pub keyring: Keyring,
}

/// The projects that want an image, each once, in the order they were added: the first is the one a
/// finding regards, the others get copies. Empty for the cluster's defaults and the file's own images.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Projects(Vec<String>);

impl Projects {
    /// `projects` without repeats, in order.
    pub fn new(projects: impl IntoIterator<Item = String>) -> Self {
        let mut p = Self::default();
        for q in projects {
            p.add(q);
        }
        p
    }

    /// Adds `project` unless it is there already.
    pub fn add(&mut self, project: String) {
        if !self.0.contains(&project) {
            self.0.push(project);
        }
    }

    /// The project a finding regards (`None`: a cluster default or the file's own image).
    pub fn first(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }

    /// The further projects (findings go to each as copies).
    pub fn others(&self) -> &[String] {
        self.0.get(1..).unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.0.clone()
    }
}

impl<'a> IntoIterator for &'a Projects {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<String> for Projects {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        Self::new(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_keep_their_order_once_each() {
        let p: Projects = ["a", "b", "a", "c"].map(String::from).into_iter().collect();
        assert_eq!(p.first(), Some("a"));
        assert_eq!(p.others(), ["b".to_string(), "c".to_string()]);
        assert_eq!(p.len(), 3);
        assert_eq!(Projects::default().others(), [] as [String; 0]);
        assert_eq!(Projects::new(None).first(), None);
    }

    #[test]
    fn a_secret_is_named_namespace_slash_name() {
        assert_eq!(SecretRef::new("team", "pull").to_string(), "team/pull");
    }
}
