//! The providers with real plugin processes (small shell scripts that count their runs).

use std::path::Path;

use super::*;

const V1: &str = "credentialprovider.kubelet.k8s.io/v1";

/// A plugin that appends the image it was asked about to `<dir>/<name>.calls` and answers `auth` for
/// `pattern` with `user`/`pw-<name>`, the given key type and duration (`-` for none).
fn plugin(dir: &Path, name: &str, pattern: &str, key_type: &str, duration: &str) {
    use std::os::unix::fs::PermissionsExt;
    let duration = match duration {
        "-" => String::new(),
        d => format!(",\"cacheDuration\":\"{d}\""),
    };
    let calls = dir.join(format!("{name}.calls"));
    let body = format!(
        "#!/bin/sh\nreq=$(cat)\nsleep 0.2\necho \"$req\" >> {calls}\nprintf '%s' '{{\"kind\":\"CredentialProviderResponse\",\"apiVersion\":\"{V1}\",\"cacheKeyType\":\"{key_type}\"{duration},\"auth\":{{\"{pattern}\":{{\"username\":\"user\",\"password\":\"pw-{name}\"}}}}}}'\n",
        calls = calls.display()
    );
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn calls(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}.calls")))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["image"].as_str().unwrap().to_string()
        })
        .collect()
}

fn providers(dir: &Path, list: &[(&str, &[&str], Duration)]) -> CredentialProviders {
    CredentialProviders::new(&ProvidersSettings {
        config: dir.join("config.yaml"),
        bin_dir: dir.to_path_buf(),
        timeout: Duration::from_secs(10),
        providers: list
            .iter()
            .map(|(name, m, d)| ProviderConfig {
                name: name.to_string(),
                match_images: m.iter().map(|s| s.to_string()).collect(),
                default_cache_duration: *d,
                api_version: V1.into(),
                args: vec![],
                env: vec![],
                wants_pod_token: false,
            })
            .collect(),
    })
}

fn passwords(l: &Lookup) -> Vec<&str> {
    l.logins.iter().map(|c| c.password.as_str()).collect()
}

fn kinds(l: &Lookup) -> Vec<String> {
    l.calls
        .iter()
        .map(|(n, c)| {
            format!(
                "{n}:{}",
                match c {
                    ProviderCall::Cached => "cached".to_string(),
                    ProviderCall::Answered => "answered".to_string(),
                    ProviderCall::Failed(e) => format!("failed({})", e.kind()),
                }
            )
        })
        .collect()
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn only_providers_whose_match_images_match_are_asked() {
    let dir = tempfile::tempdir().unwrap();
    plugin(
        dir.path(),
        "ecr",
        "*.dkr.ecr.*.amazonaws.com",
        "Registry",
        "-",
    );
    let p = providers(dir.path(), &[("ecr", &["*.dkr.ecr.*.amazonaws.com"], HOUR)]);
    let none = p.lookup("quay.io/team/runner").await;
    assert!(none.calls.is_empty() && none.logins.is_empty());
    let ecr = p
        .lookup("1234.dkr.ecr.eu-west-1.amazonaws.com/runner")
        .await;
    assert_eq!(kinds(&ecr), ["ecr:answered"]);
    assert_eq!(passwords(&ecr), ["pw-ecr"]);
    assert_eq!(
        calls(dir.path(), "ecr"),
        ["1234.dkr.ecr.eu-west-1.amazonaws.com/runner"],
        "the plugin is asked about registry/repository, as kubelet asks"
    );
}

/// N images of one registry with `cacheKeyType: Registry`, asked at once: one run.
#[tokio::test]
async fn a_registry_answer_serves_every_image_of_the_registry_even_asked_at_once() {
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "reg", "r.io", "Registry", "1h");
    let p = providers(dir.path(), &[("reg", &["r.io"], Duration::ZERO)]);
    let images: Vec<String> = (0..5).map(|i| format!("r.io/team/image-{i}")).collect();
    let found = futures::future::join_all(images.iter().map(|i| p.lookup(i))).await;
    assert!(found.iter().all(|l| passwords(l) == ["pw-reg"]));
    assert_eq!(
        calls(dir.path(), "reg").len(),
        1,
        "one run for the registry"
    );
    let mut k: Vec<String> = found.iter().flat_map(kinds).collect();
    k.sort();
    assert_eq!(
        k,
        [
            "reg:answered",
            "reg:cached",
            "reg:cached",
            "reg:cached",
            "reg:cached"
        ]
    );
    assert!(
        p.providers[0].flights.lock().unwrap().is_empty(),
        "no flight left behind"
    );
}

#[tokio::test]
async fn image_answers_are_per_image_and_a_zero_duration_is_never_kept() {
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "img", "r.io", "Image", "1h");
    plugin(dir.path(), "zero", "q.io", "Global", "0s");
    let p = providers(
        dir.path(),
        &[
            ("img", &["r.io"], Duration::ZERO),
            ("zero", &["q.io"], HOUR),
        ],
    );
    for _ in 0..2 {
        p.lookup("r.io/a").await;
        p.lookup("r.io/b").await;
        p.lookup("q.io/a").await;
    }
    assert_eq!(calls(dir.path(), "img"), ["r.io/a", "r.io/b"]);
    assert!(
        p.providers
            .iter()
            .all(|p| p.flights.lock().unwrap().is_empty()),
        "a lookup alone leaves no flight behind"
    );
    assert_eq!(
        calls(dir.path(), "zero").len(),
        2,
        "cacheDuration 0s: asked every time"
    );
}

/// No `cacheDuration` in the answer: the provider's `defaultCacheDuration` (0: not kept).
#[tokio::test]
async fn the_default_cache_duration_applies_when_the_answer_names_none() {
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "dflt", "r.io", "Global", "-");
    plugin(dir.path(), "none", "q.io", "Global", "-");
    let p = providers(
        dir.path(),
        &[
            ("dflt", &["r.io"], HOUR),
            ("none", &["q.io"], Duration::ZERO),
        ],
    );
    p.lookup("r.io/a").await;
    p.lookup("r.io/a").await;
    p.lookup("q.io/a").await;
    p.lookup("q.io/a").await;
    assert_eq!(calls(dir.path(), "dflt").len(), 1);
    assert_eq!(calls(dir.path(), "none").len(), 2);
}

#[tokio::test]
async fn a_failing_provider_gives_nothing_and_the_others_still_answer() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "good", "r.io", "Registry", "1h");
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "#!/bin/sh\necho hunter2\nexit 1\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = providers(
        dir.path(),
        &[("good", &["r.io"], HOUR), ("bad", &["*.io"], HOUR)],
    );
    let l = p.lookup("r.io/a").await;
    assert_eq!(
        kinds(&l),
        ["good:answered", "bad:failed(exit)"],
        "in the config's order"
    );
    assert_eq!(passwords(&l), ["pw-good"]);
    assert!(!format!("{l:?}").contains("hunter2"));
    assert!(!format!("{l:?}").contains("pw-good"), "{l:?}");
    // A failure is not cached: the next pull asks again.
    let again = p.lookup("r.io/a").await;
    assert_eq!(kinds(&again), ["good:cached", "bad:failed(exit)"]);
}

/// An answer's `auth` keys are matched against the image again, and the logins of every provider come
/// most specific first (kubelet adds every answer to one keyring).
#[tokio::test]
async fn answers_are_matched_again_and_merged_most_specific_first() {
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "broad", "*.r.io", "Registry", "1h");
    plugin(dir.path(), "narrow", "a.r.io/team", "Registry", "1h");
    plugin(dir.path(), "elsewhere", "q.io", "Registry", "1h");
    let p = providers(
        dir.path(),
        &[
            ("broad", &["*.r.io"], HOUR),
            ("narrow", &["a.r.io"], HOUR),
            ("elsewhere", &["*.r.io"], HOUR),
        ],
    );
    let l = p.lookup("a.r.io/team/runner").await;
    assert_eq!(
        kinds(&l),
        ["broad:answered", "narrow:answered", "elsewhere:answered"]
    );
    assert_eq!(
        passwords(&l),
        ["pw-narrow", "pw-broad"],
        "q.io's login does not apply"
    );
}

/// A KEP-4412 provider (it wants a pod's service account token) is never run.
#[tokio::test]
async fn a_provider_that_wants_a_pod_token_is_never_run() {
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "sa", "r.io", "Registry", "1h");
    let mut settings = ProvidersSettings {
        config: dir.path().join("config.yaml"),
        bin_dir: dir.path().to_path_buf(),
        timeout: Duration::from_secs(10),
        providers: vec![],
    };
    let p = providers(dir.path(), &[("sa", &["r.io"], HOUR)]);
    settings.providers = p.providers.iter().map(|p| p.config.clone()).collect();
    settings.providers[0].wants_pod_token = true;
    let l = CredentialProviders::new(&settings).lookup("r.io/a").await;
    assert!(l.calls.is_empty() && l.logins.is_empty());
    assert!(calls(dir.path(), "sa").is_empty());
}
