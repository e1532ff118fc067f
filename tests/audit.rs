//! The static contract audit against real images in the test bed's containerd: `check-image` and the
//! agent, one fixture per failure (built by scripts/testbed without Docker).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn check_image(bed: &Bed, image: &str, extra: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let out = Command::new(BIN)
        .args(["check-image", image, "--secret"])
        .arg(&secret)
        .args(extra)
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket)
        .output()
        .expect("run check-image");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (check, outcome) of every result that did not pass.
fn failures(json: &str) -> BTreeSet<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] != "pass")
        .map(|r| {
            (
                r["check"].as_str().unwrap().into(),
                r["outcome"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Layers whose content arrived earlier in another compression were never fetched by containerd: put
/// those blobs into the content store (nothing else is touched — `ctr content fetch` would re-label the
/// config blob and so drop its snapshot reference), so the blob path can read every fixture.
async fn ingest_missing_layer_blobs(bed: &Bed, fixture: &str) {
    use containerd_client::services::v1::content_client::ContentClient;
    use containerd_client::services::v1::InfoRequest;
    let rt = runner_warden::runtime::Runtime::new(&bed.socket, "k8s.io");
    let image = bed.image(&format!("runners/{fixture}:v1"));
    let resolved = runner_warden::image_audit::facts::resolve(&rt, &image)
        .await
        .expect("resolve");
    let mut content = ContentClient::new(containerd_client::connect(&bed.socket).await.unwrap());
    for layer in resolved.manifest.layers() {
        let digest = layer.digest().to_string();
        let present = content
            .info(ns(InfoRequest {
                digest: digest.clone(),
            }))
            .await
            .is_ok();
        if present {
            continue;
        }
        let script = format!(
            "curl -sf -u \"$RW_U:$RW_P\" http://{}/v2/runners/{fixture}/blobs/{digest} | {} -a {} -n k8s.io content ingest --expected-digest {digest} test-ingest-{digest}",
            bed.registry,
            bed.ctr.display(),
            bed.socket.display()
        );
        let ok = Command::new("sh")
            .args(["-c", &script])
            .env("RW_U", &bed.user)
            .env("RW_P", &bed.password)
            .status()
            .expect("sh")
            .success();
        assert!(ok, "ingest {digest} of {fixture}");
    }
}

#[tokio::test]
async fn check_image_reports_exactly_the_fixtures_failures() {
    // Serial: other tests' removals trigger content GC, which must not run between an ingest and the
    // blob path's read.
    let _g = serial().await;
    let bed = Bed::get();
    // (fixture, exit status, failing checks with their outcome)
    type Expected<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);
    let table: &[Expected] = &[
        ("audit-compliant", 0, &[]),
        ("audit-root", 1, &[("non-root-user", "violation")]),
        ("audit-named-root", 1, &[("non-root-user", "violation")]),
        ("audit-nolabel", 0, &[("contract-label", "warning")]),
        ("audit-major2", 1, &[("contract-label", "violation")]),
        (
            "audit-session-env",
            1,
            &[("baked-platform-env", "violation")],
        ),
        ("audit-sigint", 1, &[("stop-signal", "violation")]),
        ("audit-no-runner", 1, &[("required-paths", "violation")]),
        ("audit-setuid", 1, &[("setuid-files", "violation")]),
        ("audit-setuid-removed", 0, &[]),
        ("audit-opaque", 0, &[]),
        ("audit-creds", 0, &[("credentials-baked", "warning")]),
        ("audit-index", 0, &[]),
    ];
    // Every fixture through both paths: the same facts, so the same results (CRI pulls unpack, so
    // each has a snapshot; its blobs are kept unless discard_unpacked_layers is on).
    let discard = bed.discard_unpacked_layers;
    let paths: &[&str] = if discard {
        &["snapshot"]
    } else {
        &["snapshot", "blobs"]
    };
    for (fixture, code, want) in table {
        let image = bed.image(&format!("runners/{fixture}:v1"));
        // Left to choose (and pulling it first), the audit reads the snapshot.
        let (_, out, err) = check_image(&bed, &image, &["--output", "json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{fixture}: {e}: {err}"));
        assert_eq!(v["image"]["read_from"], "snapshot", "{fixture}");
        if !discard {
            ingest_missing_layer_blobs(&bed, fixture).await;
        }
        for path in paths {
            let (got_code, out, err) =
                check_image(&bed, &image, &["--output", "json", "--read-from", path]);
            assert_eq!(got_code, *code, "{fixture} from {path}: {err}{out}");
            let want: BTreeSet<(String, String)> = want
                .iter()
                .map(|(c, o)| (c.to_string(), o.to_string()))
                .collect();
            assert_eq!(failures(&out), want, "{fixture} from {path}: {out}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["image"]["read_from"], *path, "{fixture}");
        }
    }
}

#[tokio::test]
async fn details_say_what_to_change() {
    let bed = Bed::get();
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-named-root:v1"), &[]);
    assert!(
        out.contains("USER admin (uid 0 in the image's /etc/passwd) is root; add `USER 1001`"),
        "{out}"
    );
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-setuid:v1"), &[]);
    assert!(
        out.contains("setuid/setgid files: /usr/bin/helper (1 in all)"),
        "{out}"
    );
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-sigint:v1"), &[]);
    assert!(
        out.contains("STOPSIGNAL SIGINT: containerd sends SIGINT instead of SIGTERM"),
        "{out}"
    );
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-no-runner:v1"), &[]);
    assert!(out.contains("/app/ambient-runner is missing"), "{out}");
    // The table: a header, one row per check, a verdict.
    assert!(
        out.contains("CHECK                RESULT     DETAIL"),
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("required-paths "))
            .count(),
        1
    );
    assert!(
        out.trim_end().ends_with("1 violation(s), 0 warning(s)"),
        "{out}"
    );
}

#[tokio::test]
async fn the_index_is_resolved_to_the_node_platform() {
    let bed = Bed::get();
    let (code, out, err) = check_image(
        &bed,
        &bed.image("runners/audit-index:v1"),
        &["--output", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["image"]["platform"], "linux/amd64");
    // The arm64 entry runs as root; had it been chosen, non-root-user would fail.
    assert!(failures(&out).is_empty(), "{out}");
}

#[tokio::test]
async fn severity_can_be_lowered_per_check() {
    let bed = Bed::get();
    let image = bed.image("runners/audit-session-env:v1");
    let (code, out, _) = check_image(
        &bed,
        &image,
        &["--output", "json", "--warn", "baked-platform-env"],
    );
    assert_eq!(code, 0);
    assert_eq!(
        failures(&out),
        [("baked-platform-env".to_string(), "warning".to_string())].into()
    );
    let (code, _, err) = check_image(&bed, &image, &["--warn", "no-such-check"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn unreadable_images_exit_2_with_the_reason() {
    let bed = Bed::get();
    let (code, _, err) = check_image(&bed, &bed.image("runners/audit-root:no-such-tag"), &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read") && err.contains("not_found"),
        "{err}"
    );
    let (code, _, err) = check_image(&bed, "Not A Reference", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid image reference"), "{err}");
}

#[tokio::test]
async fn a_layer_containerd_never_fetched_is_read_from_the_snapshot() {
    let _g = serial().await;
    let bed = Bed::get();
    // audit-twin's gzip layer has the same uncompressed content as audit-compliant's plain one:
    // containerd never fetches its blob, but the unpacked snapshot is there.
    bed.remove_repo(&bed.image("runners/audit-twin")).await;
    let (code, _, err) = check_image(&bed, &bed.image("runners/audit-compliant:v1"), &[]);
    assert_eq!(code, 0, "{err}");
    let twin = bed.image("runners/audit-twin:v1");
    let (code, out, err) = check_image(&bed, &twin, &[]);
    assert_eq!(code, 0, "{err}{out}");
    assert!(
        out.contains("read from the unpacked overlayfs snapshot"),
        "{out}"
    );
    // The blob path alone still cannot, and says why.
    let (code, _, err) = check_image(&bed, &twin, &["--read-from", "blobs"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not in containerd's content store"),
        "{err}"
    );
    // Only the twin's own layer is missing (with discard on, which blobs are left depends on what was
    // unpacked when: some layer is named).
    let named = if bed.discard_unpacked_layers {
        "layer ".to_string()
    } else {
        "layer 1 (sha256:".to_string()
    };
    assert!(err.contains(&named) && err.contains("(sha256:"), "{err}");
}

/// An image unpacked by containerd's `native` snapshotter only (each snapshot a full copy, its view a
/// read-only bind of one directory): audited from that directory, with the same results as its blobs.
#[tokio::test]
async fn an_image_unpacked_by_the_native_snapshotter_is_read_from_its_copy() {
    let _g = serial().await;
    let bed = Bed::get();
    let repo_tag = bed.push_fresh("audit/native", &["1", "1"]);
    let image = bed.image(&repo_tag);
    let pulled = Command::new(&bed.ctr)
        .arg("--address")
        .arg(&bed.socket)
        // --local: 2.x's transfer-service pull refuses --snapshotter ("no unpack platforms defined").
        .args([
            "-n",
            "k8s.io",
            "images",
            "pull",
            "--local",
            "--snapshotter",
            "native",
            "--plain-http",
        ])
        .arg("--user")
        .arg(format!("{}:{}", bed.user, bed.password))
        .arg(&image)
        .output()
        .expect("ctr images pull");
    assert!(
        pulled.status.success(),
        "ctr pull --snapshotter native: {}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let (code, out, err) = check_image(&bed, &image, &[]);
    assert!(code == 0 || code == 1, "{err}{out}");
    assert!(
        out.contains("read from the unpacked native snapshot"),
        "{out}"
    );
    let (_, snap, _) = check_image(&bed, &image, &["--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&snap).unwrap();
    assert_eq!(v["image"]["snapshotter"], "native", "{snap}");
    let (code, blobs, err) =
        check_image(&bed, &image, &["--output", "json", "--read-from", "blobs"]);
    assert!(code == 0 || code == 1, "{err}");
    // busybox's root user at least: the comparison is not of two empty sets.
    assert!(!failures(&snap).is_empty(), "{snap}");
    assert_eq!(failures(&snap), failures(&blobs), "{snap}\n{blobs}");
    let repo = repo_tag.split_once(':').unwrap().0;
    bed.remove_repo(&bed.image(repo)).await;
}

/// What `discard_unpacked_layers` leaves (layer blobs deleted after unpacking), then a snapshot half
/// removed under it (a layer directory gone): the first still audits, from the snapshot; the second is
/// one clear cannot-read naming the image, the layer and the directory — and no view or lease is left.
#[tokio::test]
async fn discarded_blobs_audit_from_the_snapshot_and_a_half_removed_one_says_which_layer() {
    use containerd_client::services::v1::content_client::ContentClient;
    use containerd_client::services::v1::leases_client::LeasesClient;
    use containerd_client::services::v1::{DeleteContentRequest, ListRequest};
    use runner_warden::image_audit::facts::resolve;
    use runner_warden::image_audit::snapshot::{chain_ids, layout, Layout};
    use runner_warden::runtime::Runtime;

    let _g = serial().await;
    let bed = Bed::get();
    let repo_tag = bed.push_fresh("audit/discarded", &["1", "1"]);
    let image = bed.image(&repo_tag);
    let (code, before, err) = check_image(&bed, &image, &["--output", "json"]);
    assert!(code == 0 || code == 1, "{err}");

    let rt = Runtime::new(&bed.socket, "k8s.io");
    let resolved = resolve(&rt, &image).await.expect("resolve");
    let mut content = ContentClient::new(containerd_client::connect(&bed.socket).await.unwrap());
    for layer in resolved.manifest.layers() {
        let deleted = content
            .delete(ns(DeleteContentRequest {
                digest: layer.digest().to_string(),
            }))
            .await;
        // With the bed's discard_unpacked_layers on, containerd deleted them already.
        if let Err(s) = deleted {
            assert!(
                bed.discard_unpacked_layers && s.code() == tonic::Code::NotFound,
                "delete a layer blob: {s}"
            );
        }
    }
    let (code, after, err) = check_image(&bed, &image, &["--output", "json"]);
    assert!(code == 0 || code == 1, "{err}");
    assert_eq!(failures(&after), failures(&before), "{after}");
    let v: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(v["image"]["read_from"], "snapshot");

    let top = chain_ids(resolved.config.rootfs().diff_ids())
        .pop()
        .unwrap();
    let view = rt.view_snapshot("overlayfs", &top).await.expect("view");
    let Ok(Layout::Layers(dirs, _)) = layout(&view.mounts) else {
        panic!("not overlay layer directories: {:?}", view.mounts)
    };
    rt.drop_view(view).await;
    // A lower layer's directory gone (the walk finds it missing), then the top one's (containerd's View
    // does).
    for layer in [0, dirs.len() - 1] {
        let dir = dirs[layer].clone();
        let moved = dir.with_extension("moved-by-test");
        std::fs::rename(&dir, &moved).unwrap();
        let (code, _, err) = check_image(&bed, &image, &[]);
        std::fs::rename(&moved, &dir).unwrap();
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!("layer {layer} (sha256:")) && err.contains(&image),
            "{err}"
        );
        // What reaches an Event note names no node path or snapshot key (issue 24 item 10); the log
        // lines before it may.
        let said = err
            .lines()
            .find(|l| l.starts_with("runner-warden: "))
            .unwrap_or_else(|| panic!("no error line: {err}"));
        assert!(
            !said.contains(&dir.display().to_string()) && !said.contains("/snapshots/"),
            "{said}"
        );
    }

    let leases = LeasesClient::new(containerd_client::connect(&bed.socket).await.unwrap())
        .list(ns(ListRequest { filters: vec![] }))
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(
        !leases
            .iter()
            .any(|l| l.id.starts_with("runner-warden-audit-")),
        "an audit lease was left: {leases:?}"
    );
}

#[tokio::test]
async fn the_agent_audits_each_new_digest_once_and_reports_findings_and_metrics() {
    let _g = serial().await;
    let bed = Bed::get();
    let root = bed.image("runners/audit-root:v1");
    // Same content under another name: audited once, served from the cache the second time.
    retag(&bed, "runners/audit-root:v1", "runners/audit-rootcopy:v1");
    let rootcopy = bed.image("runners/audit-rootcopy:v1");
    let sigint = bed.image("runners/audit-sigint:v1");
    let nolabel = bed.image("runners/audit-nolabel:v1");
    let ok = bed.image("runners/audit-compliant:v1");
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let entries: String = [&root, &rootcopy, &sigint, &nolabel, &ok]
        .iter()
        .map(|i| {
            format!(
                "[[images]]\nimage = \"{i}\"\npull_secret = \"{}\"\nproject = \"team-x\"\n",
                secret.display()
            )
        })
        .collect();
    let agent = Agent::start_in(&bed, dir, "", &entries);

    let f = agent
        .wait_finding("RunnerImageContractViolation", &root, S(60))
        .await;
    assert_eq!(f["check"], "non-root-user");
    assert_eq!(f["outcome"], "violation");
    assert_eq!(f["regarding"]["kind"], "ProjectSettings");
    assert!(
        f["message"].as_str().unwrap().contains("add `USER 1001`"),
        "{f}"
    );
    let f = agent
        .wait_finding("RunnerImageContractViolation", &sigint, S(60))
        .await;
    assert_eq!(f["check"], "stop-signal");
    let f = agent
        .wait_finding("RunnerImageContractViolation", &nolabel, S(60))
        .await;
    assert_eq!(
        (f["check"].as_str(), f["outcome"].as_str()),
        (Some("contract-label"), Some("warning"))
    );
    agent.wait_finding("RunnerImagePrewarmed", &ok, S(60)).await;
    agent
        .wait_metric(
            "runner_warden_image_audits_total{result=\"ok\"}",
            S(30),
            |v| v == 4.0,
        )
        .await;

    let m = agent.metrics().await;
    assert_eq!(
        metric(&m, "runner_warden_image_audits_total{result=\"cached\"}"),
        Some(1.0),
        "{m}"
    );
    // Both names of the root image count.
    assert_eq!(
        metric(
            &m,
            "runner_warden_image_violations{check=\"non-root-user\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "runner_warden_image_violations{check=\"stop-signal\"}"),
        Some(1.0)
    );
    // Warnings are findings, not violations.
    assert_eq!(
        metric(
            &m,
            "runner_warden_image_violations{check=\"contract-label\"}"
        ),
        Some(0.0)
    );
    assert!(metric(&m, "runner_warden_image_audit_duration_seconds_count").unwrap() >= 4.0);
    // The compliant image yields no audit finding at all.
    assert!(!agent
        .findings()
        .iter()
        .any(|f| f["reason"] == "RunnerImageContractViolation" && f["image"] == ok.as_str()));

    // The violating image leaves the config: it no longer counts.
    let keep: String = [&sigint, &nolabel, &ok]
        .iter()
        .map(|i| {
            format!(
                "[[images]]\nimage = \"{i}\"\npull_secret = \"{}\"\n",
                agent.dir.path().join("good.json").display()
            )
        })
        .collect();
    agent.rewrite_images(&bed, "", &keep);
    agent
        .wait_metric(
            "runner_warden_image_violations{check=\"non-root-user\"}",
            S(20),
            |v| v == 0.0,
        )
        .await;
}

/// An OCI archive (`ctr images import`) of one tiny layer whose config carries `pad` bytes in a label:
/// built here from raw tar and JSON, no registry involved.
fn oci_archive_with_a_big_config(name: &str, pad: usize) -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    let body = b"1001\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    layer.append_data(&mut h, "uid", &body[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    oci_archive(
        name,
        &[layer],
        serde_json::json!({"User": "1001", "Labels": {"pad": "x".repeat(pad)}}),
    )
}

/// An OCI archive of uncompressed tar `layers` (in order) with `config` as the image config's `config`.
fn oci_archive(name: &str, layers: &[Vec<u8>], config: serde_json::Value) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| format!("sha256:{:x}", Sha256::digest(b));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha(l)).collect::<Vec<_>>()},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(l), "size": l.len()}
        )).collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest), "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "v1"},
        }],
    }))
    .unwrap();
    let mut out = tar::Builder::new(Vec::new());
    let mut put = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out.append_data(&mut h, path, data).unwrap();
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    put("index.json", &index);
    for blob in layers.iter().chain([&config, &manifest]) {
        put(&format!("blobs/sha256/{}", &sha(blob)[7..]), blob);
    }
    out.into_inner().unwrap()
}

/// One raw tar entry of a hostile layer.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    /// A directory with one xattr, as a PAX `SCHILY.xattr.<name>` record (containerd writes it as is).
    DirWithXattr(&'a str, &'a str, &'a [u8]),
}

/// A layer as raw tar, entries in the order given (no tool reorders or cleans them).
fn raw_layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, mode, body) => {
                h.set_mode(*mode);
                h.set_size(body.len() as u64);
                h.set_cksum();
                b.append_data(&mut h, p, *body).unwrap();
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::HardLink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::DirWithXattr(p, name, value) => {
                let key = format!("SCHILY.xattr.{name}");
                b.append_pax_extensions([(key.as_str(), *value)]).unwrap();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Imports `archive` into the bed's containerd as `image` (unpacked, as a pull would leave it).
/// Returns once CRI lists it too: CRI learns of an import from containerd's
/// events a moment after `ctr` lists it, and check-image, which asks CRI, would pull it in that moment
/// (not in the registry: not_found — seen once in CI on containerd 2.1 with discarded layers).
async fn import(bed: &Bed, image: &str, archive: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.tar");
    std::fs::write(&path, archive).unwrap();
    let out = Command::new(&bed.ctr)
        .arg("--address")
        .arg(&bed.socket)
        .args(["-n", "k8s.io", "images", "import", "--base-name"])
        .arg(image.rsplit_once(':').unwrap().0)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr import {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        S(30),
        &format!("CRI to list the imported {image}"),
        || async { bed.cri_status(image).await.0.then_some(()) },
    )
    .await;
}

/// The ground truth: the uid containerd runs the image's `USER` as (`ctr run`, `busybox id -u`).
fn uid_containerd_runs(bed: &Bed, image: &str, id: &str) -> String {
    let (ok, out, err) = containerd_runs(bed, image, id, &["id", "-u"]);
    assert!(ok, "ctr run {image}: {err}");
    out
}

/// `ctr run --rm image /bin/busybox args…`: whether it exited 0, its stdout (trimmed) and stderr.
fn containerd_runs(bed: &Bed, image: &str, id: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(&bed.ctr)
        .arg("--address")
        .arg(&bed.socket)
        .args(["-n", "k8s.io", "run", "--rm", image, id, "/bin/busybox"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// containerd takes a config of any size; the audit reads at most 4 MiB of JSON. Such an image is not
/// judged, and that is said: `check-image` exits 2 naming the config, and the agent tells the image's
/// project `RunnerImageNotAudited` (before, a read over the bound counted as containerd being away: a
/// WARN line only).
#[tokio::test]
async fn an_image_whose_config_is_over_the_audit_bound_is_reported_not_audited() {
    let _g = serial().await;
    let bed = Bed::get();
    let image = bed.image("hostile/big-config:v1");
    let dir = tempfile::tempdir().unwrap();
    // The ground truth: containerd imports (and unpacks) it, and CRI lists it.
    import(
        &bed,
        &image,
        &oci_archive_with_a_big_config(&image, 4_500_000),
    )
    .await;
    let listed = Command::new(&bed.ctr)
        .arg("--address")
        .arg(&bed.socket)
        .args(["-n", "k8s.io", "images", "ls", "-q"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&image),
        "imported as {image}: {}",
        String::from_utf8_lossy(&listed.stdout)
    );

    let (code, _, err) = check_image(&bed, &image, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("its config cannot be read"), "{err}");

    let secret = bed.good_secret(dir.path());
    let entries = format!(
        "[[images]]\nimage = \"{image}\"\npull_secret = \"{}\"\nproject = \"team-x\"\n",
        secret.display()
    );
    let agent = Agent::start_in(&bed, dir, "", &entries);
    let f = agent
        .wait_finding("RunnerImageNotAudited", &image, S(60))
        .await;
    let text = f["message"].as_str().unwrap();
    assert!(text.contains("its config cannot be read"), "{f}");
    assert_eq!(f["regarding"]["namespace"], "team-x", "{f}");
}

/// Issue 24 items 2b, 2c and 4: images whose `/etc/passwd` containerd finds through a symlinked parent,
/// a symlinked `/etc` or a hard link, each of which containerd runs as uid 0 while a reader of the tar
/// paths as written (the blob path before) found uid 1001. Built from raw tar layers; the ground truth is
/// `ctr run … id -u` beside each; both of the audit's paths must report `non-root-user` as a violation.
#[tokio::test]
async fn hostile_layers_are_judged_as_containerd_runs_them() {
    let _g = serial().await;
    let bed = Bed::get();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/testbed-install)");
    let base = raw_layer(&[
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", 0o755, &busybox),
        Entry::Dir("etc/"),
        Entry::File("etc/passwd", 0o644, b"runner:x:1001:0::/:/bin/sh\n"),
        Entry::Dir("srv/"),
        Entry::File("srv/passwd", 0o644, b"runner:x:0:0::/:/bin/sh\n"),
        Entry::Dir("opt/"),
        Entry::Dir("opt/etc/"),
        Entry::File("opt/etc/passwd", 0o644, b"runner:x:0:0::/:/bin/sh\n"),
    ]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Item 4: `e -> etc`, then `e/passwd` written through it, over /etc/passwd.
        (
            "symlinked-parent",
            raw_layer(&[
                Entry::Symlink("e", "etc"),
                Entry::File("e/passwd", 0o644, b"runner:x:0:0::/:/bin/sh\n"),
            ]),
        ),
        // Item 2b: /etc becomes a symlink to /opt/etc.
        (
            "symlinked-etc",
            raw_layer(&[Entry::Symlink("etc", "/opt/etc")]),
        ),
        // Item 2c: /etc/passwd becomes a hard link to /srv/passwd.
        (
            "hardlinked-passwd",
            // (Its target in the same layer: containerd's overlay applier links within a layer only.)
            raw_layer(&[
                Entry::Dir("srv/"),
                Entry::File("srv/passwd", 0o644, b"runner:x:0:0::/:/bin/sh\n"),
                Entry::HardLink("etc/passwd", "srv/passwd"),
            ]),
        ),
    ];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (name, top) in cases {
        let image = bed.image(&format!("hostile/{name}-{nanos}:v1"));
        import(
            &bed,
            &image,
            &oci_archive(
                &image,
                &[base.clone(), top],
                serde_json::json!({"User": "runner"}),
            ),
        )
        .await;
        assert_eq!(
            uid_containerd_runs(&bed, &image, &format!("rw-hostile-{name}-{nanos}")),
            "0",
            "{name}: containerd runs it as root"
        );
        let paths: &[&str] = match bed.discard_unpacked_layers {
            true => &["snapshot"],
            false => &["snapshot", "blobs"],
        };
        for path in paths {
            let (code, out, err) =
                check_image(&bed, &image, &["--output", "json", "--read-from", path]);
            assert_eq!(code, 1, "{name} from {path}: {err}{out}");
            assert!(
                failures(&out).contains(&("non-root-user".to_string(), "violation".to_string())),
                "{name} from {path}: {out}"
            );
        }
        bed.remove_repo(image.rsplit_once(':').unwrap().0).await;
    }
}

/// Issue 24 item 1: containerd writes a layer's `SCHILY.xattr.*` records as real xattrs — all but
/// `trusted.*`, which it refuses — and the kernel reads `trusted.overlay.*` on a rootful node, never
/// `user.overlay.*`. So a directory a tenant marks `user.overlay.opaque=y` (or `trusted.overlay.opaque`)
/// hides nothing: the setuid file below stays, setuid, in the container (the snapshot path before took
/// `user.overlay.opaque` as opaque and passed the image). A `user.overlay.redirect` means nothing to a
/// rootful node (the snapshot path, which knows the mount, judges the image) but would to a rootless
/// one (the blob path, which cannot know, does not judge it). Ground truth from `ctr run … stat` beside
/// each.
#[tokio::test]
async fn overlay_xattrs_in_layers_are_judged_as_the_kernel_reads_them() {
    let _g = serial().await;
    let bed = Bed::get();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/testbed-install)");
    let base = raw_layer(&[
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", 0o755, &busybox),
        Entry::Dir("etc/"),
        Entry::File("etc/passwd", 0o644, b"runner:x:1001:0::/:/bin/sh\n"),
        Entry::Dir("srv/"),
        Entry::Dir("usr/"),
        Entry::Dir("usr/bin/"),
        Entry::File("usr/bin/su", 0o4755, b"not really su"),
    ]);
    // (case, top layer, what `ls /srv` shows in the container, the audit's exit code from the
    // snapshot and from the blobs)
    type Case<'a> = (&'a str, Vec<u8>, &'a str, i32, i32);
    let cases: Vec<Case> = vec![
        (
            "user-opaque",
            raw_layer(&[Entry::DirWithXattr("usr/bin/", "user.overlay.opaque", b"y")]),
            "",
            1,
            1,
        ),
        (
            "trusted-opaque",
            raw_layer(&[Entry::DirWithXattr(
                "usr/bin/",
                "trusted.overlay.opaque",
                b"y",
            )]),
            "",
            1,
            1,
        ),
        (
            "user-redirect",
            raw_layer(&[Entry::DirWithXattr(
                "srv/",
                "user.overlay.redirect",
                b"/usr/bin",
            )]),
            "",
            1,
            2,
        ),
    ];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (name, top, srv, from_snapshot, from_blobs) in cases {
        let image = bed.image(&format!("hostile/{name}-{nanos}:v1"));
        import(
            &bed,
            &image,
            &oci_archive(
                &image,
                &[base.clone(), top],
                serde_json::json!({"User": "runner"}),
            ),
        )
        .await;
        let id = format!("rw-xattr-{name}-{nanos}");
        let (ok, mode, err) =
            containerd_runs(&bed, &image, &id, &["stat", "-c", "%a", "/usr/bin/su"]);
        assert_eq!(
            (ok, mode.as_str()),
            (true, "4755"),
            "{name}: ctr run stat: {err}"
        );
        let (ok, listed, err) = containerd_runs(&bed, &image, &format!("{id}-ls"), &["ls", "/srv"]);
        assert_eq!(
            (ok, listed.as_str()),
            (true, srv),
            "{name}: ctr run ls: {err}"
        );
        let mut paths = vec![("snapshot", from_snapshot)];
        if !bed.discard_unpacked_layers {
            paths.push(("blobs", from_blobs));
        }
        for (path, code) in paths {
            let (got, out, err) =
                check_image(&bed, &image, &["--output", "json", "--read-from", path]);
            assert_eq!(got, code, "{name} from {path}: {err}{out}");
            if code == 1 {
                assert!(
                    failures(&out).contains(&("setuid-files".to_string(), "violation".to_string())),
                    "{name} from {path}: {out}"
                );
            } else {
                assert!(
                    err.contains("/srv carries the overlayfs attribute user.overlay.redirect"),
                    "{name} from {path}: {err}"
                );
            }
        }
        bed.remove_repo(image.rsplit_once(':').unwrap().0).await;
    }
}
