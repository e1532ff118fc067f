//! Node caps on what is prewarmed and pinned. Pinned images are exempt from kubelet's image GC, so without
//! a cap a cluster with many projects fills every node's disk with nothing left to relieve the pressure.
//! Pure: the prewarmer ranks its desired set here and holds only what fits.
//!
//! Which images win: the cluster's defaults first (every session may use them), then the images most
//! projects want, then by reference (so every node with the same set makes the same choice).

use std::collections::BTreeMap;

use crate::model::{Caps, DesiredImage, OverCap};
use crate::reference::ImageRef;

/// The desired set split by the caps, each part in rank order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allotment {
    pub held: Vec<DesiredImage>,
    pub over: Vec<(DesiredImage, OverCap)>,
}

/// How many projects want `d` (a cluster default counts as wanted by all: it ranks first anyway).
fn wanted_by(d: &DesiredImage) -> usize {
    d.projects.len()
}

/// `want` in rank order: cluster defaults (no project), then most-wanted, then by reference.
pub fn rank(want: &[DesiredImage]) -> Vec<DesiredImage> {
    let mut ranked = want.to_vec();
    ranked.sort_by(|a, b| {
        let default = |d: &DesiredImage| d.projects.is_empty();
        default(b)
            .cmp(&default(a))
            .then(wanted_by(b).cmp(&wanted_by(a)))
            .then(a.image.cmp(&b.image))
    });
    ranked
}

/// Splits `want` by `caps`. `sizes` holds the size of every image seen present; an image not yet pulled
/// counts as 0 until its size is known (its pull tells), so the byte cap is judged on what is on disk.
pub fn allot(want: &[DesiredImage], caps: Caps, sizes: &BTreeMap<ImageRef, u64>) -> Allotment {
    let mut out = Allotment::default();
    let mut held_bytes: u64 = 0;
    for d in rank(want) {
        if out.held.len() >= caps.images {
            out.over.push((d, OverCap::Images { limit: caps.images }));
            continue;
        }
        let size = sizes.get(&d.image).copied().unwrap_or(0);
        match caps.bytes {
            Some(limit) if held_bytes.saturating_add(size) > limit => {
                out.over.push((
                    d,
                    OverCap::Bytes {
                        limit,
                        size,
                        held: held_bytes,
                    },
                ));
            }
            _ => {
                held_bytes = held_bytes.saturating_add(size);
                out.held.push(d);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(image: &str, projects: &[&str]) -> DesiredImage {
        let mut d = DesiredImage::new(ImageRef::parse(image).unwrap(), None, None);
        d.projects = projects.iter().map(|p| p.to_string()).collect();
        d
    }

    fn names(ds: &[DesiredImage]) -> Vec<&str> {
        ds.iter().map(|d| d.image.as_str()).collect()
    }

    #[test]
    fn defaults_rank_first_then_the_most_wanted_then_by_reference() {
        let set = [
            want("r.io/b:1", &["p1"]),
            want("r.io/a:1", &["p2"]),
            want("r.io/shared:1", &["p3", "p4", "p5"]),
            want("r.io/default:1", &[]),
            want("r.io/pair:1", &["p6", "p7"]),
        ];
        assert_eq!(
            names(&rank(&set)),
            [
                "r.io/default:1",
                "r.io/shared:1",
                "r.io/pair:1",
                "r.io/a:1",
                "r.io/b:1"
            ]
        );
    }

    #[test]
    fn the_image_cap_holds_the_first_in_rank() {
        let set = [
            want("r.io/b:1", &["p1"]),
            want("r.io/a:1", &["p2"]),
            want("r.io/default:1", &[]),
        ];
        let caps = Caps {
            images: 2,
            bytes: None,
        };
        let a = allot(&set, caps, &BTreeMap::new());
        assert_eq!(names(&a.held), ["r.io/default:1", "r.io/a:1"]);
        assert_eq!(a.over.len(), 1);
        assert_eq!(a.over[0].0.image.as_str(), "r.io/b:1");
        assert_eq!(a.over[0].1, OverCap::Images { limit: 2 });
        assert_eq!(a.over[0].1.label(), "images");
        // Exactly at the cap: nothing over.
        let caps = Caps {
            images: 3,
            bytes: None,
        };
        assert!(allot(&set, caps, &BTreeMap::new()).over.is_empty());
    }

    #[test]
    fn the_byte_cap_counts_known_sizes_in_rank_order_and_skips_only_what_does_not_fit() {
        let set = [
            want("r.io/big:1", &["p1"]),
            want("r.io/small:1", &["p2"]),
            want("r.io/default:1", &[]),
            want("r.io/new:1", &["p3"]),
        ];
        let sizes: BTreeMap<ImageRef, u64> = [
            ("r.io/default:1", 60),
            ("r.io/big:1", 50),
            ("r.io/small:1", 40),
        ]
        .into_iter()
        .map(|(i, s)| (ImageRef::parse(i).unwrap(), s))
        .collect();
        let caps = Caps {
            images: 10,
            bytes: Some(100),
        };
        let a = allot(&set, caps, &sizes);
        // default (60) + big (50) > 100: big is over; small (40) fits exactly; new (unknown) counts 0.
        assert_eq!(
            names(&a.held),
            ["r.io/default:1", "r.io/new:1", "r.io/small:1"]
        );
        assert_eq!(
            a.over,
            vec![(
                want("r.io/big:1", &["p1"]),
                OverCap::Bytes {
                    limit: 100,
                    size: 50,
                    held: 60
                }
            )]
        );
        assert_eq!(a.over[0].1.label(), "bytes");
        // No byte cap: all held.
        let caps = Caps {
            images: 10,
            bytes: None,
        };
        assert_eq!(allot(&set, caps, &sizes).held.len(), 4);
    }

    #[test]
    fn an_empty_set_holds_nothing() {
        assert_eq!(
            allot(&[], Caps::default(), &BTreeMap::new()),
            Allotment::default()
        );
    }
}
