//! Tags resolved once per cluster (docs/fleet.md, "Tags resolved once per cluster"): the document the
//! reporter publishes and every node reads, and the reporter's rule for the next document. Pure: the
//! clock is an argument, the registry and the API server are in `kubernetes::resolved_tags`.
//!
//! Before, every node asked the registry for every tag every `prewarm.resolve_interval`: 5,000 nodes ×
//! 100 images every 10 minutes is ~830 manifest requests a second. Now the reporter (the Lease holder)
//! asks once per tag per interval and publishes tag → digest in one ConfigMap; nodes pull the digest and
//! point the tag at it locally. Registry cost: the number of images, not of nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::reference::ImageRef;

/// The ConfigMap in the agent's namespace, and its key.
pub const CONFIGMAP: &str = "runner-warden-resolved-tags";
pub const KEY: &str = "resolved-tags.json";
const VERSION: u32 = 1;

/// An unchanged document is confirmed (`checked` rewritten) this often, so nodes can tell a live reporter
/// from a gone one: one write per cluster per half hour, one watch event per node.
pub const HEARTBEAT: Duration = Duration::from_secs(30 * 60);
/// A tag the reporter cannot resolve keeps its last digest for this many rounds in a row (a registry
/// blip must not send every node to the registry), then leaves the document (nodes resolve it
/// themselves, slowly, and report why they cannot).
pub const KEEP_FAILING_ROUNDS: u32 = 3;
/// At most this many tags are published (~150 bytes each: well under a ConfigMap's 1 MiB).
pub const MAX_TAGS: usize = 5_000;

/// What the reporter published: tag reference → the manifest digest it names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedTags {
    pub version: u32,
    /// Unix seconds at which the reporter last resolved or confirmed the document.
    pub checked: i64,
    /// The reporter's `prewarm.resolve_interval`, in seconds (how old `checked` may get).
    pub resolve_seconds: u64,
    /// Canonical tag reference → `sha256:<hex>`.
    pub tags: BTreeMap<String, String>,
    /// Tags left out over `MAX_TAGS`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub left_out: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ResolvedTags {
    pub fn parse(json: &str) -> Result<Self, String> {
        let doc: ResolvedTags =
            serde_json::from_str(json).map_err(|e| format!("not the expected JSON: {e}"))?;
        if doc.version != VERSION {
            return Err(format!(
                "version {} (this agent reads {VERSION}): agents of different versions; the newer reporter's document wins",
                doc.version
            ));
        }
        if let Some((tag, digest)) = doc.tags.iter().find(|(_, d)| !is_digest(d)) {
            return Err(format!("{tag} names {digest:?}, not a digest"));
        }
        Ok(doc)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }

    /// Whether a node may trust the document at `now`: the reporter confirmed it within two heartbeats
    /// plus one resolution round (clocks of nodes differ by seconds, not by an hour).
    pub fn is_fresh(&self, now: i64) -> bool {
        let allowed = 2 * HEARTBEAT.as_secs() + self.resolve_seconds;
        self.checked > 0 && now.saturating_sub(self.checked) <= allowed as i64
    }

    /// The digest reference the cluster resolved `image` (a tag) to — `name@sha256:…` — when the
    /// document is fresh at `now` and lists it.
    pub fn digest_ref(&self, image: &ImageRef, now: i64) -> Option<ImageRef> {
        if image.is_pinned_by_digest() || !self.is_fresh(now) {
            return None;
        }
        let digest = self.tags.get(image.as_str())?;
        ImageRef::parse(&format!("{}@{digest}", image.name())).ok()
    }
}

/// `sha256:` and 64 lowercase hex digits (or another algorithm's `alg:hex`).
pub fn is_digest(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once(':') else {
        return false;
    };
    !alg.is_empty()
        && alg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
        && hex.len() >= 32
        && hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        && (alg != "sha256" || hex.len() == 64)
}

/// The reporter's memory between rounds: how many rounds in a row each tag failed.
#[derive(Debug, Default)]
pub struct Rounds {
    failing: BTreeMap<String, u32>,
}

impl Rounds {
    /// The document after a round at `now` that resolved `results` for the `wanted` tags (a tag not in
    /// `results` was not asked this round and keeps its digest). `prev`: what is published.
    pub fn next(
        &mut self,
        prev: &ResolvedTags,
        wanted: &BTreeSet<String>,
        results: &BTreeMap<String, Result<String, String>>,
        now: i64,
        resolve_interval: Duration,
    ) -> ResolvedTags {
        self.failing.retain(|t, _| wanted.contains(t));
        let mut tags = BTreeMap::new();
        for tag in wanted {
            let digest = match results.get(tag) {
                Some(Ok(d)) => {
                    self.failing.remove(tag);
                    Some(d.clone())
                }
                Some(Err(_)) => {
                    let n = self.failing.entry(tag.clone()).or_default();
                    *n += 1;
                    match *n >= KEEP_FAILING_ROUNDS {
                        true => None,
                        false => prev.tags.get(tag).cloned(),
                    }
                }
                None => prev.tags.get(tag).cloned(),
            };
            if let Some(d) = digest {
                tags.insert(tag.clone(), d);
            }
        }
        let left_out = tags.len().saturating_sub(MAX_TAGS);
        if left_out > 0 {
            // Sorted by reference: the same tags stay in from round to round.
            tags = tags.into_iter().take(MAX_TAGS).collect();
        }
        let resolve_seconds = resolve_interval.as_secs();
        let same = tags == prev.tags
            && left_out == prev.left_out
            && resolve_seconds == prev.resolve_seconds
            && prev.version == VERSION;
        let due = now.saturating_sub(prev.checked) >= HEARTBEAT.as_secs() as i64;
        ResolvedTags {
            version: VERSION,
            checked: match same && !due {
                true => prev.checked,
                false => now,
            },
            resolve_seconds,
            tags,
            left_out,
        }
    }

    /// Tags failing this many rounds in a row (for the log).
    pub fn failing(&self, tag: &str) -> u32 {
        self.failing.get(tag).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const MIN10: Duration = Duration::from_secs(600);

    fn wanted(tags: &[&str]) -> BTreeSet<String> {
        tags.iter().map(|t| t.to_string()).collect()
    }

    fn results(rs: &[(&str, Result<&str, &str>)]) -> BTreeMap<String, Result<String, String>> {
        rs.iter()
            .map(|(t, r)| (t.to_string(), r.map(String::from).map_err(String::from)))
            .collect()
    }

    #[test]
    fn a_round_publishes_each_wanted_tag_and_drops_the_rest() {
        let mut r = Rounds::default();
        let prev = ResolvedTags {
            tags: [("r.io/old:1".to_string(), D1.to_string())].into(),
            ..Default::default()
        };
        let doc = r.next(
            &prev,
            &wanted(&["r.io/a:1", "r.io/b:1"]),
            &results(&[("r.io/a:1", Ok(D1)), ("r.io/b:1", Ok(D2))]),
            1000,
            MIN10,
        );
        assert_eq!(doc.version, VERSION);
        assert_eq!(doc.checked, 1000);
        assert_eq!(doc.resolve_seconds, 600);
        assert_eq!(
            doc.tags,
            BTreeMap::from([
                ("r.io/a:1".to_string(), D1.to_string()),
                ("r.io/b:1".to_string(), D2.to_string())
            ])
        );
    }

    #[test]
    fn an_unchanged_round_keeps_checked_until_the_heartbeat_is_due() {
        let mut r = Rounds::default();
        let w = wanted(&["r.io/a:1"]);
        let res = results(&[("r.io/a:1", Ok(D1))]);
        let first = r.next(&ResolvedTags::default(), &w, &res, 1000, MIN10);
        let h = HEARTBEAT.as_secs() as i64;
        // Nothing changed, heartbeat not due: the same document (no write).
        assert_eq!(r.next(&first, &w, &res, 1000 + h - 1, MIN10), first);
        // Due: only `checked` moves.
        let beat = r.next(&first, &w, &res, 1000 + h, MIN10);
        assert_eq!(beat.checked, 1000 + h);
        assert_eq!(beat.tags, first.tags);
        // A moved tag is written at once.
        let moved = r.next(&first, &w, &results(&[("r.io/a:1", Ok(D2))]), 1001, MIN10);
        assert_eq!((moved.checked, moved.tags["r.io/a:1"].as_str()), (1001, D2));
    }

    #[test]
    fn a_failing_tag_keeps_its_digest_for_a_few_rounds_then_leaves() {
        let mut r = Rounds::default();
        let w = wanted(&["r.io/a:1"]);
        let mut doc = r.next(
            &ResolvedTags::default(),
            &w,
            &results(&[("r.io/a:1", Ok(D1))]),
            0,
            MIN10,
        );
        let fail = results(&[("r.io/a:1", Err("401"))]);
        for round in 1..KEEP_FAILING_ROUNDS {
            doc = r.next(&doc, &w, &fail, round as i64, MIN10);
            assert_eq!(doc.tags.get("r.io/a:1").map(String::as_str), Some(D1));
            assert_eq!(r.failing("r.io/a:1"), round);
        }
        doc = r.next(&doc, &w, &fail, 99, MIN10);
        assert!(doc.tags.is_empty(), "{doc:?}");
        // Resolved again: back, and the count starts over.
        doc = r.next(&doc, &w, &results(&[("r.io/a:1", Ok(D2))]), 100, MIN10);
        assert_eq!(doc.tags["r.io/a:1"], D2);
        assert_eq!(r.failing("r.io/a:1"), 0);
        // A tag not asked this round keeps its digest.
        let kept = r.next(&doc, &w, &BTreeMap::new(), 101, MIN10);
        assert_eq!(kept.tags, doc.tags);
    }

    #[test]
    fn the_document_is_bounded() {
        let mut r = Rounds::default();
        let tags: Vec<String> = (0..MAX_TAGS + 3)
            .map(|i| format!("r.io/a:{i:05}"))
            .collect();
        let w: BTreeSet<String> = tags.iter().cloned().collect();
        let res = tags
            .iter()
            .map(|t| (t.clone(), Ok(D1.to_string())))
            .collect();
        let doc = r.next(&ResolvedTags::default(), &w, &res, 0, MIN10);
        assert_eq!((doc.tags.len(), doc.left_out), (MAX_TAGS, 3));
        assert!(doc.to_json().len() < 768 * 1024);
    }

    #[test]
    fn a_node_trusts_only_a_fresh_document_and_only_tags() {
        let image = ImageRef::parse("127.0.0.1:5000/a/b:v1").unwrap();
        let doc = ResolvedTags {
            version: VERSION,
            checked: 10_000,
            resolve_seconds: 600,
            tags: [(image.as_str().to_string(), D1.to_string())].into(),
            left_out: 0,
        };
        let want = format!("127.0.0.1:5000/a/b@{D1}");
        assert_eq!(
            doc.digest_ref(&image, 10_000)
                .map(|r| r.as_str().to_string()),
            Some(want.clone())
        );
        let limit = 10_000 + 2 * HEARTBEAT.as_secs() as i64 + 600;
        assert!(doc.digest_ref(&image, limit).is_some());
        assert!(doc.digest_ref(&image, limit + 1).is_none(), "stale");
        assert!(ResolvedTags::default().digest_ref(&image, 0).is_none());
        let other = ImageRef::parse("127.0.0.1:5000/a/b:v2").unwrap();
        assert!(doc.digest_ref(&other, 10_000).is_none());
        let by_digest = ImageRef::parse(&want).unwrap();
        assert!(doc.digest_ref(&by_digest, 10_000).is_none());
    }

    #[test]
    fn parsing_checks_version_and_digests() {
        let good = ResolvedTags {
            version: VERSION,
            checked: 5,
            resolve_seconds: 600,
            tags: [("r.io/a:1".to_string(), D1.to_string())].into(),
            left_out: 0,
        };
        assert_eq!(ResolvedTags::parse(&good.to_json()).unwrap(), good);
        let mut bad = good.clone();
        bad.tags.insert("r.io/b:1".into(), "latest".into());
        assert!(ResolvedTags::parse(&bad.to_json())
            .unwrap_err()
            .contains("not a digest"));
        let mut newer = good;
        newer.version = 2;
        assert!(ResolvedTags::parse(&newer.to_json())
            .unwrap_err()
            .contains("version 2"));
        assert!(ResolvedTags::parse("{").is_err());
    }

    #[test]
    fn the_heartbeat_is_half_an_hour_and_left_out_is_written_only_when_some_are() {
        // docs/fleet.md's cost figures assume it.
        assert_eq!(HEARTBEAT, Duration::from_secs(1800));
        let mut doc = ResolvedTags {
            version: VERSION,
            ..Default::default()
        };
        assert!(!doc.to_json().contains("leftOut"), "{}", doc.to_json());
        doc.left_out = 2;
        assert!(doc.to_json().contains("\"leftOut\":2"), "{}", doc.to_json());
    }

    #[test]
    fn a_document_never_confirmed_is_not_fresh() {
        let doc = ResolvedTags {
            version: VERSION,
            checked: 0,
            resolve_seconds: 600,
            ..Default::default()
        };
        assert!(!doc.is_fresh(100));
        assert!(ResolvedTags { checked: 1, ..doc }.is_fresh(100));
    }

    #[test]
    fn digests_are_recognised() {
        assert!(is_digest(D1));
        assert!(!is_digest("sha256:abc"));
        assert!(!is_digest("sha256:"));
        assert!(!is_digest(&D1.to_uppercase()));
        assert!(is_digest(&format!("sha512:{}", "a".repeat(128))));
        assert!(!is_digest("v1"));
    }
}
