//! The node's `CredentialProviderConfig`, read and validated as kubelet reads it
//! (`pkg/credentialprovider/plugin/config.go` and `validateCredentialProviderConfig` in
//! `pkg/kubelet/apis/config/validation/validation.go`): YAML or JSON, `kubelet.config.k8s.io/v1`,
//! `v1beta1` or `v1alpha1`, every problem reported at once. Unknown fields are ignored, as kubelet's
//! decoder ignores them, so a config written for a newer kubelet still loads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::credentials::is_url_pattern;

pub const CONFIG_API_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];
/// The plugin API versions a provider may name (`apiVersion`); requests and answers use it.
pub const PLUGIN_API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
/// A provider config is a few hundred bytes; a larger file is not one.
pub const CONFIG_MAX: u64 = 1 << 20;

/// One provider as the config names it.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// The plugin's file name in the bin dir, and the provider's name in messages and metrics.
    pub name: String,
    pub match_images: Vec<String>,
    pub default_cache_duration: Duration,
    pub api_version: String,
    pub args: Vec<String>,
    /// Set in the plugin's environment on top of the agent's own (kubelet merges the same way).
    pub env: Vec<(String, String)>,
    /// `tokenAttributes` is set: the plugin wants a pod's service account token (KEP-4412), which a node
    /// agent has none of; such a provider is never run (`CredentialProviders::new` leaves it out).
    pub wants_pod_token: bool,
}

/// Env values are often credentials or account ids: names only.
impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("match_images", &self.match_images)
            .field("default_cache_duration", &self.default_cache_duration)
            .field("api_version", &self.api_version)
            .field("wants_pod_token", &self.wants_pod_token)
            .field("args", &self.args.len())
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    providers: Vec<RawProvider>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProvider {
    #[serde(default)]
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnv>,
    /// v1's service-account-token providers (KEP-4412): read, never run (docs/credential-providers.md).
    token_attributes: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawEnv {
    name: String,
    #[serde(default)]
    value: String,
}

/// Reads and validates `path`; `bin_dir` must hold a plugin for every provider (kubelet refuses to start
/// otherwise). The problems name the file and the provider, never an env value.
pub fn read(path: &Path, bin_dir: &Path) -> Result<Vec<ProviderConfig>, Vec<String>> {
    let at = |p: String| format!("credential provider config {}: {p}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| vec![at(format!("cannot read it ({e})"))])?;
    if meta.len() > CONFIG_MAX {
        return Err(vec![at(format!(
            "is {} bytes; a CredentialProviderConfig is at most {CONFIG_MAX} (is it the right file?)",
            meta.len()
        ))]);
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![at(format!("cannot read it ({e})"))])?;
    let providers = parse(&text).map_err(|ps| ps.into_iter().map(at).collect::<Vec<_>>())?;
    let mut problems = Vec::new();
    match std::fs::metadata(bin_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => problems.push(format!(
            "credential_providers.bin_dir {} is not a directory",
            bin_dir.display()
        )),
        Err(e) => problems.push(format!(
            "credential_providers.bin_dir {}: {e}",
            bin_dir.display()
        )),
    }
    if problems.is_empty() {
        for p in &providers {
            let bin = bin_dir.join(&p.name);
            match std::fs::metadata(&bin) {
                Ok(m) if m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0 => {}
                Ok(m) if m.is_file() => problems.push(at(format!(
                    "provider {:?}: {} is not executable",
                    p.name,
                    bin.display()
                ))),
                Ok(_) => problems.push(at(format!(
                    "provider {:?}: {} is not a file",
                    p.name,
                    bin.display()
                ))),
                Err(e) => problems.push(at(format!(
                    "provider {:?}: its plugin {} cannot be found ({e}); the plugin's file name must be the provider's name",
                    p.name,
                    bin.display()
                ))),
            }
        }
    }
    match problems.is_empty() {
        true => Ok(providers),
        false => Err(problems),
    }
}

/// Parses and validates a config's text (YAML, or JSON, which is YAML).
pub fn parse(text: &str) -> Result<Vec<ProviderConfig>, Vec<String>> {
    let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| {
        // The parser's message may quote the document, and an env value in it: say where only.
        vec![format!(
            "is not a CredentialProviderConfig document ({})",
            yaml_problem(&e)
        )]
    })?;
    let mut problems = Vec::new();
    match raw.api_version.as_deref() {
        Some(v) if CONFIG_API_VERSIONS.contains(&v) => {}
        Some(v) => problems.push(format!(
            "apiVersion {v:?} is not one of {}",
            CONFIG_API_VERSIONS.join(", ")
        )),
        None => problems.push(format!(
            "apiVersion is missing (one of {})",
            CONFIG_API_VERSIONS.join(", ")
        )),
    }
    if raw.kind.as_deref() != Some("CredentialProviderConfig") {
        problems.push("kind must be CredentialProviderConfig".to_string());
    }
    if raw.providers.is_empty() {
        problems.push("providers: at least one provider is required".to_string());
    }
    let mut seen = std::collections::HashSet::new();
    let mut providers = Vec::new();
    for (i, p) in raw.providers.into_iter().enumerate() {
        let at = |what: String| format!("providers[{i}] ({:?}): {what}", p.name);
        let before = problems.len();
        if p.name.is_empty() {
            problems.push(at("name is required".into()));
        } else if p.name.contains('/') {
            problems.push(at("name cannot contain '/'".into()));
        } else if p.name.contains(' ') {
            problems.push(at("name cannot contain spaces".into()));
        } else if p.name == "." || p.name == ".." {
            problems.push(at(format!("name cannot be {:?}", p.name)));
        } else if !seen.insert(p.name.clone()) {
            problems.push(at("duplicate name".into()));
        }
        if p.api_version.is_empty() {
            problems.push(at("apiVersion is required".into()));
        } else if !PLUGIN_API_VERSIONS.contains(&p.api_version.as_str()) {
            problems.push(at(format!(
                "apiVersion {:?} is not one of {}",
                p.api_version,
                PLUGIN_API_VERSIONS.join(", ")
            )));
        }
        if p.match_images.is_empty() {
            problems.push(at("matchImages: at least one pattern is required".into()));
        }
        for m in &p.match_images {
            if !is_url_pattern(m) {
                problems.push(at(format!(
                    "matchImages entry {m:?} is not a registry pattern (host[:port][/path], globs in the host)"
                )));
            }
        }
        let default_cache_duration = match p.default_cache_duration.as_deref() {
            None => {
                problems.push(at(
                    "defaultCacheDuration is required (e.g. \"12h\"; \"0\" caches nothing unless the plugin's answer says how long)".into(),
                ));
                Duration::ZERO
            }
            Some(d) => match go_duration(d) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(at(format!("defaultCacheDuration {d:?}: {e}")));
                    Duration::ZERO
                }
            },
        };
        if problems.len() == before {
            providers.push(ProviderConfig {
                name: p.name,
                match_images: p.match_images,
                default_cache_duration,
                api_version: p.api_version,
                args: p.args,
                env: p.env.into_iter().map(|e| (e.name, e.value)).collect(),
                wants_pod_token: p.token_attributes.is_some(),
            });
        }
    }
    match problems.is_empty() {
        true => Ok(providers),
        false => Err(problems),
    }
}

/// Where a YAML error is, never what the document says there.
fn yaml_problem(e: &serde_saphyr::Error) -> String {
    match e.location() {
        Some(l) => format!("at line {}, column {}", l.line(), l.column()),
        None => "its structure does not match".to_string(),
    }
}

/// A Go `time.Duration` string (`metav1.Duration` in kubelet's types): `"12h"`, `"1h30m"`, `"1.5h"`,
/// `"300ms"`, `"0"`. Negative durations are refused (kubelet's validation refuses them in a config; an
/// answer's negative duration is "do not cache", see `plugin`).
pub fn go_duration(text: &str) -> Result<Duration, String> {
    let (negative, s) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("is empty; write e.g. \"12h\" or \"30m\"".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..n]
            .parse()
            .map_err(|_| format!("{text:?} is not a duration; write e.g. \"12h\" or \"30m\""))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{text:?} lacks a unit (h, m, s, ms)")),
            other => return Err(format!("{text:?}: unknown unit {other:?} (h, m, s, ms)")),
        };
        rest = &rest[u..];
        total += number * seconds;
    }
    if negative && total > 0.0 {
        return Err("must be greater than or equal to 0".into());
    }
    // Go's Duration tops out at about 292 years.
    Duration::try_from_secs_f64(total.min(9.2e9)).map_err(|e| format!("{text:?}: {e}"))
}

/// Settings of `[credential_providers]` once read: the providers with the paths they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ProvidersSettings {
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    /// How long one plugin run may take (kubelet: one minute).
    pub timeout: Duration,
    pub providers: Vec<ProviderConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EKS: &str = r#"{
  "apiVersion": "kubelet.config.k8s.io/v1",
  "kind": "CredentialProviderConfig",
  "providers": [
    {
      "name": "ecr-credential-provider",
      "matchImages": [
        "*.dkr.ecr.*.amazonaws.com",
        "*.dkr.ecr.*.amazonaws.com.cn",
        "*.dkr.ecr-fips.*.amazonaws.com",
        "*.dkr.ecr.us-iso-east-1.c2s.ic.gov",
        "*.dkr.ecr.us-isob-east-1.sc2s.sgov.gov"
      ],
      "defaultCacheDuration": "12h",
      "apiVersion": "credentialprovider.kubelet.k8s.io/v1"
    }
  ]
}"#;

    #[test]
    fn reads_the_eks_config_as_json() {
        let p = parse(EKS).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "ecr-credential-provider");
        assert_eq!(p[0].match_images.len(), 5);
        assert_eq!(p[0].default_cache_duration, Duration::from_secs(12 * 3600));
        assert!(p[0].env.is_empty() && p[0].args.is_empty());
    }

    #[test]
    fn reads_yaml_with_args_and_env_and_every_version() {
        for (config, plugin) in CONFIG_API_VERSIONS.iter().zip(PLUGIN_API_VERSIONS) {
            let text = format!(
                "apiVersion: {config}\nkind: CredentialProviderConfig\nproviders:\n- name: acr-credential-provider\n  apiVersion: {plugin}\n  defaultCacheDuration: 10m\n  matchImages: [\"*.azurecr.io\", \"*.azurecr.cn\"]\n  args: [/etc/kubernetes/azure.json]\n  env:\n  - name: SECRET_THING\n    value: hunter2\n  somethingNewer: true\n"
            );
            let p = parse(&text).unwrap_or_else(|e| panic!("{config}: {e:?}"));
            assert_eq!(p[0].api_version, plugin);
            assert_eq!(p[0].args, ["/etc/kubernetes/azure.json"]);
            assert_eq!(p[0].env, [("SECRET_THING".into(), "hunter2".into())]);
            assert_eq!(p[0].default_cache_duration, Duration::from_secs(600));
            assert!(!format!("{:?}", p[0]).contains("hunter2"));
        }
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_the_provider() {
        let text = r#"
apiVersion: kubelet.config.k8s.io/v2
kind: Config
providers:
- name: a/b
  apiVersion: credentialprovider.kubelet.k8s.io/v2
  matchImages: []
- name: ok
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  matchImages: ["r.io"]
  defaultCacheDuration: -1h
- name: ok
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  matchImages: ["r.io:port", "%invalid%"]
- name: "my plugin"
  matchImages: ["r.io"]
- name: ".."
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  matchImages: ["r.io"]
  defaultCacheDuration: "0"
  tokenAttributes: {serviceAccountTokenAudience: x}
"#;
        let e = parse(text).unwrap_err();
        let all = e.join("\n");
        for want in [
            "apiVersion \"kubelet.config.k8s.io/v2\" is not one of",
            "kind must be CredentialProviderConfig",
            "providers[0] (\"a/b\"): name cannot contain '/'",
            "providers[0] (\"a/b\"): apiVersion \"credentialprovider.kubelet.k8s.io/v2\"",
            "providers[0] (\"a/b\"): matchImages: at least one",
            "providers[1] (\"ok\"): defaultCacheDuration \"-1h\": must be greater than or equal to 0",
            "providers[2] (\"ok\"): duplicate name",
            "providers[2] (\"ok\"): matchImages entry \"r.io:port\"",
            "providers[2] (\"ok\"): matchImages entry \"%invalid%\"",
            "providers[3] (\"my plugin\"): name cannot contain spaces",
            "providers[3] (\"my plugin\"): apiVersion is required",
            "providers[4] (\"..\"): name cannot be \"..\"",
        ] {
            assert!(all.contains(want), "{want:?} not in\n{all}");
        }
        assert!(
            all.contains("providers[0] (\"a/b\"): defaultCacheDuration is required"),
            "{all}"
        );
        assert_eq!(e.len(), 15, "{all}");
        assert!(parse(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders: []\n"
        )
        .unwrap_err()[0]
            .contains("at least one provider"));
    }

    /// KEP-4412 providers load (a kubelet config may mix them with others) and are marked.
    #[test]
    fn a_service_account_token_provider_is_read_and_marked() {
        let p = parse("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: sa\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n  matchImages: [r.io]\n  defaultCacheDuration: 0s\n  tokenAttributes: {serviceAccountTokenAudience: x, requireServiceAccount: true}\n- name: plain\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n  matchImages: [q.io]\n  defaultCacheDuration: 0s\n").unwrap();
        assert!(p[0].wants_pod_token && !p[1].wants_pod_token);
    }

    #[test]
    fn a_broken_document_is_located_never_quoted() {
        for text in [
            "providers:\n- name: x\n  env:\n  - name: K\n    value: [hunter2\n",
            "providers: hunter2",
            "{\"providers\": [{\"env\": [{\"value\": \"hunter2\"}]}]}",
        ] {
            let e = parse(text).unwrap_err().join("\n");
            assert!(!e.contains("hunter2"), "{e}");
            assert!(
                e.contains("is not a CredentialProviderConfig document"),
                "{e}"
            );
        }
    }

    #[test]
    fn go_durations() {
        for (text, secs) in [
            ("0", 0.0),
            ("0s", 0.0),
            ("12h", 43200.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("300ms", 0.3),
            ("2m3.5s", 123.5),
            ("10us", 0.00001),
            ("+5s", 5.0),
            ("-0s", 0.0),
        ] {
            assert_eq!(
                go_duration(text),
                Ok(Duration::from_secs_f64(secs)),
                "{text}"
            );
        }
        for bad in ["", "12", "h", "1d", "-1s", "1h-2m", "1..2s", "abc"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_plugin_must_be_in_the_bin_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, EKS).unwrap();
        let bin = dir.path().join("bin");
        let e = read(&config, &bin).unwrap_err().join("\n");
        assert!(e.contains("credential_providers.bin_dir"), "{e}");
        std::fs::create_dir(&bin).unwrap();
        let e = read(&config, &bin).unwrap_err().join("\n");
        assert!(
            e.contains("provider \"ecr-credential-provider\": its plugin")
                && e.contains("cannot be found"),
            "{e}"
        );
        let plugin = bin.join("ecr-credential-provider");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        let e = read(&config, &bin).unwrap_err().join("\n");
        assert!(e.contains("is not executable"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(read(&config, &bin).unwrap().len(), 1);
        let e = read(&dir.path().join("nope.yaml"), &bin)
            .unwrap_err()
            .join("\n");
        assert!(e.contains("nope.yaml: cannot read it"), "{e}");
    }
}
