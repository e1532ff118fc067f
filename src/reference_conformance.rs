//! Conformance with distribution/reference, the parser the platform uses: the inputs and expected results
//! of its own test tables (github.com/distribution/reference, `normalize_test.go`), as data. Deviations
//! kept on purpose are listed in docs/conformance.md.

use super::*;

/// `TestValidateReferenceName`, valid names.
const VALID_REFERENCE_NAMES: &[&str] = &[
    "docker/docker",
    "library/debian",
    "debian",
    "docker.io/docker/docker",
    "docker.io/library/debian",
    "docker.io/debian",
    "index.docker.io/docker/docker",
    "index.docker.io/library/debian",
    "index.docker.io/debian",
    "127.0.0.1:5000/docker/docker",
    "127.0.0.1:5000/library/debian",
    "127.0.0.1:5000/debian",
    "192.168.0.1",
    "192.168.0.1:80",
    "192.168.0.1:8/debian",
    "192.168.0.2:25000/debian",
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
    "[fc00::1]:5000/docker",
    "[fc00::1]:5000/docker/docker",
    "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
    "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
    "Docker/docker",
    "DOCKER/docker",
];

/// `TestValidateReferenceName`, invalid names.
const INVALID_REFERENCE_NAMES: &[&str] = &[
    "https://github.com/docker/docker",
    "docker/Docker",
    "-docker",
    "-docker/docker",
    "-docker.io/docker/docker",
    "docker///docker",
    "docker.io/docker/Docker",
    "docker.io/docker///docker",
    "[fc00::1]",
    "[fc00::1]:5000",
    "fc00::1:5000/debian",
    "[fe80::1%eth0]:5000/debian",
    "[2001:db8:3:4::192.0.2.33]:5000/debian",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
];

/// `TestValidateRemoteName`, valid names.
const VALID_REMOTE_NAMES: &[&str] = &[
    "docker/docker",
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
    "docker-rules/docker",
    "docker---rules/docker",
    "doc/docker",
    "d/docker",
    "jess/t",
    "dock__er/docker",
];

/// `TestValidateRemoteName`, invalid names.
const INVALID_REMOTE_NAMES: &[&str] = &[
    "docker/Docker",
    "docker///docker",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
    "-docker/docker",
    "docker-/docker",
    "-docker-/docker",
    "____/____",
    "_docker/_docker",
    "dock..er/docker",
    "dock_.er/docker",
    "dock-.er/docker",
    "docker/",
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255/docker",
];

#[test]
fn distribution_validate_reference_name() {
    for n in VALID_REFERENCE_NAMES.iter().chain(VALID_REMOTE_NAMES) {
        assert!(
            ImageRef::parse(n).is_ok(),
            "{n} should parse: {:?}",
            ImageRef::parse(n)
        );
    }
    for n in INVALID_REFERENCE_NAMES.iter().chain(INVALID_REMOTE_NAMES) {
        assert!(ImageRef::parse(n).is_err(), "{n} should be rejected");
    }
}

/// `TestParseRepositoryInfo`: (RemoteName, FamiliarName, FullName, AmbiguousName, Domain). Every one of
/// the familiar, full and ambiguous spellings must give the same domain, path and full name.
const REPOSITORY_INFO: &[(&str, &str, &str, &str, &str)] = &[
    (
        "fooo/bar",
        "fooo/bar",
        "docker.io/fooo/bar",
        "index.docker.io/fooo/bar",
        "docker.io",
    ),
    (
        "library/ubuntu",
        "ubuntu",
        "docker.io/library/ubuntu",
        "library/ubuntu",
        "docker.io",
    ),
    (
        "nonlibrary/ubuntu",
        "nonlibrary/ubuntu",
        "docker.io/nonlibrary/ubuntu",
        "",
        "docker.io",
    ),
    (
        "other/library",
        "other/library",
        "docker.io/other/library",
        "",
        "docker.io",
    ),
    (
        "private/moonbase",
        "127.0.0.1:8000/private/moonbase",
        "127.0.0.1:8000/private/moonbase",
        "",
        "127.0.0.1:8000",
    ),
    (
        "privatebase",
        "127.0.0.1:8000/privatebase",
        "127.0.0.1:8000/privatebase",
        "",
        "127.0.0.1:8000",
    ),
    (
        "private/moonbase",
        "example.com/private/moonbase",
        "example.com/private/moonbase",
        "",
        "example.com",
    ),
    (
        "privatebase",
        "example.com/privatebase",
        "example.com/privatebase",
        "",
        "example.com",
    ),
    (
        "private/moonbase",
        "example.com:8000/private/moonbase",
        "example.com:8000/private/moonbase",
        "",
        "example.com:8000",
    ),
    (
        "privatebasee",
        "example.com:8000/privatebasee",
        "example.com:8000/privatebasee",
        "",
        "example.com:8000",
    ),
    (
        "library/ubuntu-12.04-base",
        "ubuntu-12.04-base",
        "docker.io/library/ubuntu-12.04-base",
        "index.docker.io/library/ubuntu-12.04-base",
        "docker.io",
    ),
    (
        "library/foo",
        "foo",
        "docker.io/library/foo",
        "docker.io/foo",
        "docker.io",
    ),
    (
        "library/foo/bar",
        "library/foo/bar",
        "docker.io/library/foo/bar",
        "",
        "docker.io",
    ),
    (
        "store/foo/bar",
        "store/foo/bar",
        "docker.io/store/foo/bar",
        "",
        "docker.io",
    ),
    ("bar", "Foo/bar", "Foo/bar", "", "Foo"),
    ("bar", "FOO/bar", "FOO/bar", "", "FOO"),
];

#[test]
fn distribution_parse_repository_info() {
    for (remote, familiar, full, ambiguous, domain) in REPOSITORY_INFO {
        for spelling in [familiar, full, ambiguous]
            .into_iter()
            .filter(|s| !s.is_empty())
        {
            let r = ImageRef::parse(spelling).unwrap_or_else(|e| panic!("{spelling}: {e}"));
            assert_eq!(r.registry(), *domain, "domain of {spelling}");
            assert_eq!(r.repository(), *remote, "path of {spelling}");
            assert_eq!(r.name(), *full, "full name of {spelling}");
        }
    }
}

/// `TestNormalizedSplitHostname`: (input, domain, path).
const SPLIT_HOSTNAME: &[(&str, &str, &str)] = &[
    ("test.com/foo", "test.com", "foo"),
    ("test_com/foo", "docker.io", "test_com/foo"),
    ("docker/migrator", "docker.io", "docker/migrator"),
    ("test.com:8080/foo", "test.com:8080", "foo"),
    ("test-com:8080/foo", "test-com:8080", "foo"),
    ("foo", "docker.io", "library/foo"),
    ("xn--n3h.com/foo", "xn--n3h.com", "foo"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo"),
    ("docker.io/foo", "docker.io", "library/foo"),
    ("docker.io/library/foo", "docker.io", "library/foo"),
    ("docker.io/library/foo/bar", "docker.io", "library/foo/bar"),
];

#[test]
fn distribution_normalized_split_hostname() {
    for (input, domain, path) in SPLIT_HOSTNAME {
        let r = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!((r.registry(), r.repository()), (*domain, *path), "{input}");
    }
}

/// `TestParseAnyReference`, the cases that name a repository (bare ids are not references to prewarm):
/// (reference, equivalent). Tagless references are `:latest` here, as the platform pulls them.
const ANY_REFERENCE: &[(&str, &str)] = &[
    ("redis", "docker.io/library/redis"),
    ("redis:latest", "docker.io/library/redis:latest"),
    ("docker.io/library/redis:latest", "docker.io/library/redis:latest"),
    ("redis@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c", "docker.io/library/redis@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"),
    ("docker.io/library/redis@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c", "docker.io/library/redis@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"),
    ("dmcgowan/myapp", "docker.io/dmcgowan/myapp"),
    ("dmcgowan/myapp:latest", "docker.io/dmcgowan/myapp:latest"),
    ("docker.io/mcgowan/myapp:latest", "docker.io/mcgowan/myapp:latest"),
    ("dmcgowan/myapp@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c", "docker.io/dmcgowan/myapp@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"),
    ("docker.io/dmcgowan/myapp@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c", "docker.io/dmcgowan/myapp@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"),
    ("dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9", "docker.io/library/dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9"),
    ("dbcc1", "docker.io/library/dbcc1"),
];

#[test]
fn distribution_parse_any_reference() {
    for (input, equivalent) in ANY_REFERENCE {
        let r = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        let tagless = !equivalent.contains('@')
            && !equivalent[equivalent.rfind('/').unwrap()..].contains(':');
        let want = if tagless {
            format!("{equivalent}:latest")
        } else {
            equivalent.to_string()
        };
        assert_eq!(r.as_str(), want, "{input}");
        assert_eq!(
            ImageRef::parse(equivalent).unwrap(),
            r,
            "{input} ≡ {equivalent}"
        );
    }
}

/// `TestParseReferenceWithTagAndDigest`.
#[test]
fn distribution_tag_and_digest() {
    let short =
        "busybox:latest@sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";
    let r = ImageRef::parse(short).unwrap();
    assert_eq!(r.as_str(), format!("docker.io/library/{short}"));
    assert_eq!(r.tag(), Some("latest"));
    assert!(r.digest().is_some() && r.is_pinned_by_digest());
}

#[test]
fn ipv6_registries_keep_their_brackets_and_port() {
    let r = ImageRef::parse("[fc00::1]:5000/docker/docker:v1").unwrap();
    assert_eq!(r.registry(), "[fc00::1]:5000");
    assert_eq!(r.registry_hostname(), "[fc00::1]");
    assert_eq!(r.repository(), "docker/docker");
    let r = ImageRef::parse("[fc00::1]/docker").unwrap();
    assert_eq!(r.registry_hostname(), "[fc00::1]");
    assert!(ImageRef::parse("[fc00::1]:x/docker").is_err());
}
