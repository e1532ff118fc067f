//! Conformance with kubelet's keyring: the inputs and expected results of its own test tables
//! (kubernetes `pkg/credentialprovider/keyring_test.go`), as data. Kubelet's `Lookup` takes the image
//! string as written; runner-warden looks up the normalised `registry/repository` (`ImageRef::name`),
//! so image inputs go through `ImageRef` first. Deviations kept on purpose: docs/conformance.md.

use super::*;
use crate::reference::ImageRef;

/// A keyring whose only key is `key`, in the legacy `.dockercfg` shape kubelet's tests use.
fn only(key: &str) -> Keyring {
    let doc = serde_json::json!({ key: { "email": "foo@bar.baz", "auth": base64::engine::general_purpose::STANDARD.encode("foo:bar") } });
    Keyring::parse(doc.to_string().as_bytes()).unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// `TestUrlsMatch`: (glob, target, match expected).
const URLS_MATCH: &[(&str, &str, bool)] = &[
    ("*.kubernetes.io", "prefix.kubernetes.io", true),
    ("prefix.*.io", "prefix.kubernetes.io", true),
    ("prefix.kubernetes.*", "prefix.kubernetes.io", true),
    ("*-good.kubernetes.io", "prefix-good.kubernetes.io", true),
    ("*.kubernetes.io/blah", "prefix.kubernetes.io/blah", true),
    ("prefix.*.io/foo", "prefix.kubernetes.io/foo/bar", true),
    (
        "*.kubernetes.io:1111/blah",
        "prefix.kubernetes.io:1111/blah",
        true,
    ),
    (
        "prefix.*.io:1111/foo",
        "prefix.kubernetes.io:1111/foo/bar",
        true,
    ),
    ("*.kubernetes.io", "kubernetes.io", false),
    ("*.*.kubernetes.io", "prefix.kubernetes.io", false),
    ("*.*.kubernetes.io", "kubernetes.io", false),
    // Added upstream in 1.29 (kubernetes PR #119947); the behaviour was the same before.
    ("*kubernetes.io", "a.kubernetes.io", false),
    ("*kubernetes.io", "kubernetes.io", true),
    ("*.*.*.kubernetes.io", "a.b.c.kubernetes.io", true),
    ("kubernetes.io", "kubernetes.com", false),
    ("k*.io", "quay.io", false),
    (
        "*.kubernetes.io:1234/blah",
        "prefix.kubernetes.io:1111/blah",
        false,
    ),
    (
        "prefix.*.io/foo",
        "prefix.kubernetes.io:1111/foo/bar",
        false,
    ),
];

/// The same table through `urls_match`, the matcher of credential providers' `matchImages` (kubelet's
/// `isImageAllowed` calls `URLsMatchStr` itself).
#[test]
fn kubelet_urls_match_for_match_images() {
    for (glob, target, want) in URLS_MATCH {
        assert_eq!(urls_match(glob, target), *want, "{glob} vs {target}");
    }
}

/// `matchImages` entries and the images kubelet's `Test_Provide` (pkg/credentialprovider/plugin) gives
/// its plugin: each must be allowed.
const PROVIDE: &[(&str, &str)] = &[
    ("test.registry.io", "test.registry.io/foo/bar"),
    ("test.registry.io/foo/bar", "test.registry.io/foo/bar"),
    ("test.registry.io", "test.registry.io"),
    ("*.registry.io:8080", "test.registry.io:8080/foo"),
    ("*.*.registry.io", "foo.bar.registry.io/foo/bar"),
    ("*.registry.io", "test.registry.io"),
    ("*.registry.io", "test.registry.io/foo/bar"),
];

#[test]
fn kubelet_provide_match_images() {
    for (glob, image) in PROVIDE {
        assert!(urls_match(glob, image), "{glob} vs {image}");
    }
}

/// Where `URLsMatchStr` differs from a pull secret's key matching: it compares as written (case, no Docker
/// Hub alias), its labels are `filepath.Match` globs with classes and escapes, and it refuses what
/// `url.Parse` refuses (validation: `%invalid%` is kubelet's own test of a bad `matchImages` entry).
#[test]
fn match_images_are_compared_as_kubelet_parses_them() {
    let table: &[(&str, &str, bool)] = &[
        ("Registry.io", "registry.io/a", false),
        ("index.docker.io", "docker.io/library/busybox", false),
        ("r[0-9].io", "r1.io/a", true),
        ("r[0-9].io", "rx.io/a", false),
        ("r[^0-9].io", "rx.io/a", true),
        ("r[!0-9].io", "r!.io/a", true),
        ("r\\*.io", "r*.io/a", true),
        ("r\\*.io", "rx.io/a", false),
        ("r[.io", "r[.io/a", false),
        ("r.io/a%2Fb", "r.io/a/b/c", true),
        ("r.io/pong", "r.io/pongz", true),
    ];
    for (glob, target, want) in table {
        assert_eq!(urls_match(glob, target), *want, "{glob} vs {target}");
    }
    for bad in ["%invalid%", "r.io/a%zz", "r.io:port", "r .io", "r%41.io"] {
        assert!(!is_url_pattern(bad), "{bad}");
    }
    for good in [
        "*.dkr.ecr.*.amazonaws.com",
        "r.io:5000/runners",
        "[::1]:5000",
    ] {
        assert!(is_url_pattern(good), "{good}");
    }
}

#[test]
fn kubelet_urls_match() {
    for (glob, target, want) in URLS_MATCH {
        let (g, t) = (Pattern::key(glob).unwrap(), Pattern::parse(target).unwrap());
        assert_eq!(g.matches(&t), *want, "{glob} vs {target}");
    }
}

/// `TestDockerKeyringForGlob`: (key, image prefix); each looked up as `<prefix>/foo/bar` must hit.
const KEYRING_FOR_GLOB: &[(&str, &str)] = &[
    ("https://hello.kubernetes.io", "hello.kubernetes.io"),
    ("https://*.docker.io", "prefix.docker.io"),
    ("https://prefix.*.io", "prefix.docker.io"),
    ("https://prefix.docker.*", "prefix.docker.io"),
    ("https://*.docker.io/path", "prefix.docker.io/path"),
    ("https://prefix.*.io/path", "prefix.docker.io/path/subpath"),
    ("https://prefix.docker.*/path", "prefix.docker.io/path"),
    ("https://*.docker.io:8888", "prefix.docker.io:8888"),
    ("https://prefix.*.io:8888", "prefix.docker.io:8888"),
    ("https://prefix.docker.*:8888", "prefix.docker.io:8888"),
    (
        "https://*.docker.io/path:1111",
        "prefix.docker.io/path:1111",
    ),
    ("https://*.docker.io/v1/", "prefix.docker.io/path:1111"),
    ("https://*.docker.io/v2/", "prefix.docker.io/path:1111"),
    (
        "https://prefix.docker.*/path:1111",
        "prefix.docker.io/path:1111",
    ),
    ("prefix.docker.io:1111", "prefix.docker.io:1111/path"),
    ("*.docker.io:1111", "prefix.docker.io:1111/path"),
];

#[test]
fn kubelet_keyring_for_glob() {
    for (key, target) in KEYRING_FOR_GLOB {
        let ring = only(key);
        let creds = ring.lookup(&format!("{target}/foo/bar"));
        assert_eq!(creds.len(), 1, "{key} should match {target}/foo/bar");
        assert_eq!(
            (creds[0].username.as_str(), creds[0].password.as_str()),
            ("foo", "bar")
        );
    }
}

/// `TestKeyringMiss`: (key, image prefix); each looked up as `<prefix>/foo/bar` must miss.
const KEYRING_MISS: &[(&str, &str)] = &[
    ("https://hello.kubernetes.io", "world.mesos.org/foo/bar"),
    ("https://*.docker.com", "prefix.docker.io"),
    ("https://suffix.*.io", "prefix.docker.io"),
    ("https://prefix.docker.c*", "prefix.docker.io"),
    (
        "https://prefix.*.io/path:1111",
        "prefix.docker.io/path/subpath:1111",
    ),
    ("suffix.*.io", "prefix.docker.io"),
];

#[test]
fn kubelet_keyring_miss() {
    for (key, target) in KEYRING_MISS {
        assert!(
            only(key).lookup(&format!("{target}/foo/bar")).is_empty(),
            "{key} should not match {target}/foo/bar"
        );
    }
}

/// The Docker Hub cases (`TestKeyringMissWithDockerHubCredentials`, `TestKeyringHitWithUnqualified…`,
/// `TestKeyringHitWithQualifiedDockerHub`): the key `https://index.docker.io/v1/` (kubelet's
/// `defaultRegistryKey`) serves Docker Hub images however they are written, and nothing else.
#[test]
fn kubelet_docker_hub_key() {
    let hub = only("https://index.docker.io/v1/");
    for (image, hit) in [
        ("world.mesos.org/foo/bar", false),
        ("google/docker-registry", true),
        ("jenkins", true),
        ("index.docker.io/google/docker-registry", true),
    ] {
        let name = ImageRef::parse(image).unwrap().name();
        assert_eq!(hub.lookup(&name).len(), usize::from(hit), "{image}");
    }
}

/// `TestIsDefaultRegistryMatch`: which image names are Docker Hub's.
#[test]
fn kubelet_is_default_registry_match() {
    for (image, hub) in [
        ("foo/bar", true),
        ("docker.io/foo/bar", true),
        ("index.docker.io/foo/bar", true),
        ("foo", true),
        ("", false),
        ("registry.tld/foo/bar", false),
        ("registry:5000/foo/bar", false),
        ("myhostdocker.io/foo/bar", false),
    ] {
        let is_hub = ImageRef::parse(image).is_ok_and(|r| r.registry() == "docker.io");
        assert_eq!(is_hub, hub, "{image:?}");
    }
}

#[test]
fn api_version_prefixes_name_the_registry_not_a_repository() {
    let k = only("https://r.io/v2/team");
    assert_eq!(k.lookup("r.io/team/app").len(), 1);
    assert!(k.lookup("r.io/other/app").is_empty());
    assert_eq!(only("r.io/v1/").lookup("r.io/any/app").len(), 1);
    // An image whose repository starts with v1 is still matched by its full path.
    assert_eq!(only("r.io").lookup("r.io/v1/app").len(), 1);
    assert!(only("r.io/team").lookup("r.io/v1/team").is_empty());
    // IPv6 registries keep their port apart from the address.
    let k = only("[fc00::1]:5000");
    assert_eq!(k.lookup("[fc00::1]:5000/app").len(), 1);
    assert!(k.lookup("[fc00::1]:5001/app").is_empty());
}
