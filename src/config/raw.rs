//! The file as TOML gives it: every key optional, unknown keys rejected. `sections` validates it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) containerd: RawContainerd,
    #[serde(default)]
    pub(super) prewarm: RawPrewarm,
    #[serde(default)]
    pub(super) report: RawReport,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default)]
    pub(super) runtime_audit: RawRuntimeAudit,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) kubernetes: RawKubernetes,
    #[serde(default)]
    pub(super) fleet: RawFleet,
    #[serde(default)]
    pub(super) credential_providers: RawCredentialProviders,
    #[serde(default)]
    pub(super) images: Vec<RawImage>,
}

/// The node's kubelet credential provider plugins: the same two paths kubelet is given
/// (`--image-credential-provider-config`, `--image-credential-provider-bin-dir`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentialProviders {
    pub(super) config: Option<PathBuf>,
    pub(super) bin_dir: Option<PathBuf>,
    pub(super) timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawContainerd {
    pub(super) socket: Option<PathBuf>,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrewarm {
    pub(super) concurrency: Option<i64>,
    pub(super) stall_timeout: Option<String>,
    pub(super) resolve_interval: Option<String>,
    pub(super) pin: Option<bool>,
    pub(super) backoff_initial: Option<String>,
    pub(super) backoff_max: Option<String>,
    pub(super) failure_finding_after: Option<i64>,
    pub(super) max_images: Option<i64>,
    pub(super) max_pinned_bytes: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReport {
    pub(super) metrics_address: Option<String>,
    pub(super) findings: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) enabled: Option<bool>,
    pub(super) cache_dir: Option<PathBuf>,
    pub(super) label_keys: Option<Vec<String>>,
    pub(super) expected_major: Option<u64>,
    #[serde(default)]
    pub(super) severity: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntimeAudit {
    pub(super) enabled: Option<bool>,
    pub(super) interval: Option<String>,
    pub(super) proc_connector: Option<bool>,
    pub(super) containers: Option<Vec<String>>,
    pub(super) all_containers: Option<bool>,
    pub(super) uid: Option<u32>,
    pub(super) uid_range: Option<String>,
    pub(super) check_bounding_set: Option<bool>,
    pub(super) namespace_uid_range: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub(super) enabled: Option<bool>,
    pub(super) node_name: Option<String>,
    pub(super) custom_runner_image_enabled: Option<bool>,
    pub(super) allowed_registries: Option<Vec<String>>,
    pub(super) default_images: Option<Vec<String>>,
    pub(super) agent_registry: Option<String>,
    pub(super) lease_namespace: Option<String>,
    pub(super) secret_refresh: Option<String>,
    pub(super) session_images: Option<bool>,
    pub(super) session_images_forget: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) enabled: Option<bool>,
    pub(super) slow_fraction: Option<f64>,
    pub(super) stop_records: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImage {
    pub(super) image: Option<String>,
    pub(super) pull_secret: Option<PathBuf>,
    pub(super) project: Option<String>,
}

/// Parses the file, reporting every TOML problem rather than the first: a key whose value is of the wrong
/// type, or that no section knows, is reported (line, key, what was expected, in the config's words) and
/// left out, and parsing goes on. A line that breaks the TOML syntax itself ends the search.
pub(super) fn read(text: &str) -> (Option<RawFile>, Vec<String>) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut problems = Vec::new();
    for _ in 0..100 {
        let current = lines.join("\n");
        match toml::from_str::<RawFile>(&current) {
            Ok(raw) => return (Some(raw), problems),
            Err(e) => {
                let line = e
                    .span()
                    .map(|s| current[..s.start.min(current.len())].matches('\n').count());
                let Some(line) = line.filter(|l| *l < lines.len() && is_key_line(&lines[*l]))
                else {
                    let at = line
                        .map(|l| format!("line {}: ", l + 1))
                        .unwrap_or_default();
                    problems.push(format!("{at}{}", in_config_words(e.message()).trim()));
                    return (None, problems);
                };
                let key = lines[line]
                    .split('=')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let section = section_of(&lines, line);
                let name = match section {
                    Some(s) => format!("{s}.{key}"),
                    None => key,
                };
                problems.push(format!(
                    "line {}: {name}: {}",
                    line + 1,
                    in_config_words(e.message())
                ));
                lines[line].clear();
            }
        }
    }
    (None, problems)
}

/// `key = value` (not a table header, comment or blank line).
fn is_key_line(line: &str) -> bool {
    let t = line.trim_start();
    !t.starts_with('[') && !t.starts_with('#') && t.contains('=')
}

/// The table a line belongs to (`images[]` for an array of tables), from the nearest header above it.
fn section_of(lines: &[String], line: usize) -> Option<String> {
    lines[..line].iter().rev().find_map(|l| {
        let t = l.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            Some(format!("{}[]", name.trim()))
        } else {
            t.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|n| n.trim().to_string())
        }
    })
}

/// serde's and toml's words into the config's: `expected i64` is "expected an integer".
fn in_config_words(message: &str) -> String {
    let m = message.replace("unknown field", "unknown key");
    let Some(rest) = m.strip_prefix("invalid type: ") else {
        return m;
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return m;
    };
    let expected = match expected.trim() {
        "i64" | "u64" | "u32" | "usize" | "i32" => "an integer (e.g. 2)",
        "f64" | "f32" => "a number (e.g. 0.5)",
        "a boolean" => "true or false",
        "a string" => "a quoted string (e.g. \"30s\")",
        "a sequence" => "a list (e.g. [\"a\", \"b\"])",
        "a map" => "a table",
        other => other,
    };
    let found = found
        .replace("sequence", "a list")
        .replace("map", "a table");
    format!("expected {expected}, found {found}")
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) node_status: Option<bool>,
    pub(super) heartbeat: Option<String>,
    pub(super) max_nodes_pulling: Option<i64>,
    pub(super) central_tags: Option<bool>,
    pub(super) fallback_resolve_interval: Option<String>,
}
