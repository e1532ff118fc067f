//! One provider's cache of answers, as kubelet keeps it (`pluginProvider` in
//! `pkg/credentialprovider/plugin/plugin.go`): an answer is kept under the image, its registry or one
//! global key, as the answer's `cacheKeyType` says, until its duration ends; a lookup tries the image,
//! then its registry, then the global key. Expired entries are dropped when met and in a sweep at most
//! every 15 minutes (kubelet's purge interval), so a node that pulled from 1,000 registries once does not
//! keep 1,000 answers. Pure: time comes in as an argument.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::plugin::Logins;

const PURGE_EVERY: Duration = Duration::from_secs(15 * 60);

/// Which images an answer covers (`cacheKeyType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    Image,
    Registry,
    Global,
}

/// A cache key: kept typed, so an image or registry can never collide with the global key (kubelet's
/// string `"global"` could, in theory).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Image(String),
    Registry(String),
    Global,
}

/// kubelet's `parseRegistry`: the image's first path component (host and port).
pub fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

pub struct Cache {
    entries: HashMap<Key, (Arc<Logins>, Instant)>,
    last_purge: Instant,
}

impl Cache {
    pub fn new(now: Instant) -> Self {
        Self {
            entries: HashMap::new(),
            last_purge: now,
        }
    }

    /// The cached answer covering `image`, if one has not expired.
    pub fn get(&mut self, image: &str, now: Instant) -> Option<Arc<Logins>> {
        if now.saturating_duration_since(self.last_purge) >= PURGE_EVERY {
            self.entries.retain(|_, (_, until)| *until >= now);
            self.last_purge = now;
        }
        for key in [
            Key::Image(image.to_string()),
            Key::Registry(registry_of(image).to_string()),
            Key::Global,
        ] {
            match self.entries.get(&key) {
                // Expired only once past its end (client-go's ExpirationStore: now.After(expiresAt)).
                Some((logins, until)) if *until >= now => return Some(logins.clone()),
                Some(_) => {
                    self.entries.remove(&key);
                }
                None => {}
            }
        }
        None
    }

    /// Keeps `logins` (the answer for `image`) for `ttl`; a zero `ttl` keeps nothing.
    pub fn put(
        &mut self,
        image: &str,
        kind: KeyType,
        logins: Arc<Logins>,
        ttl: Duration,
        now: Instant,
    ) {
        if ttl.is_zero() {
            return;
        }
        let key = match kind {
            KeyType::Image => Key::Image(image.to_string()),
            KeyType::Registry => Key::Registry(registry_of(image).to_string()),
            KeyType::Global => Key::Global,
        };
        self.entries.insert(key, (logins, now + ttl));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logins(tag: &str) -> Arc<Logins> {
        Arc::new(Logins::for_test(tag))
    }

    #[test]
    fn an_answer_covers_what_its_key_type_says_until_it_expires() {
        let t0 = Instant::now();
        let mut c = Cache::new(t0);
        // Minutes, so no sweep (every 15 minutes) hides what a lookup does with an expired entry.
        let m = Duration::from_secs(60);
        c.put("r.io/a", KeyType::Image, logins("image"), m, t0);
        assert_eq!(c.get("r.io/a", t0).unwrap().tag(), "image");
        assert!(
            c.get("r.io/b", t0).is_none(),
            "an Image answer covers that image only"
        );
        c.put("r.io/a", KeyType::Registry, logins("registry"), 2 * m, t0);
        assert_eq!(
            c.get("r.io/a", t0).unwrap().tag(),
            "image",
            "the image's own entry first"
        );
        assert_eq!(c.get("r.io/b", t0).unwrap().tag(), "registry");
        assert!(
            c.get("r.io:5000/b", t0).is_none(),
            "another port is another registry"
        );
        c.put("q.io/x", KeyType::Global, logins("global"), 3 * m, t0);
        assert_eq!(c.get("elsewhere.io/x", t0).unwrap().tag(), "global");
        // Still good at its very end (expired only once past it), then the next key's answer.
        assert_eq!(c.get("r.io/a", t0 + m).unwrap().tag(), "image");
        let later = t0 + m + Duration::from_millis(1);
        assert_eq!(c.get("r.io/a", later).unwrap().tag(), "registry");
        assert_eq!(c.get("r.io/a", later + m).unwrap().tag(), "global");
        assert!(c.get("r.io/a", later + 2 * m).is_none());
        assert_eq!(c.len(), 0, "expired entries met by a lookup are dropped");
    }

    #[test]
    fn a_zero_duration_is_not_kept() {
        let t0 = Instant::now();
        let mut c = Cache::new(t0);
        c.put("r.io/a", KeyType::Registry, logins("x"), Duration::ZERO, t0);
        assert!(c.get("r.io/a", t0).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_sweep_drops_expired_answers_never_looked_up_again() {
        let t0 = Instant::now();
        let mut c = Cache::new(t0);
        for i in 0..100 {
            c.put(
                &format!("r{i}.io/a"),
                KeyType::Registry,
                logins("x"),
                Duration::from_secs(60),
                t0,
            );
        }
        c.put(
            "keep.io/a",
            KeyType::Image,
            logins("keep"),
            Duration::from_secs(3600),
            t0,
        );
        assert!(c.get("other.io/a", t0 + Duration::from_secs(120)).is_none());
        assert_eq!(c.len(), 101, "no sweep before 15 minutes");
        // One more expiring exactly at the sweep: kept (not yet past its end).
        c.put("edge.io/a", KeyType::Image, logins("edge"), PURGE_EVERY, t0);
        assert!(c.get("other.io/a", t0 + PURGE_EVERY).is_none());
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("keep.io/a", t0 + PURGE_EVERY).unwrap().tag(), "keep");
    }

    #[test]
    fn the_registry_is_the_first_component() {
        assert_eq!(registry_of("127.0.0.1:5000/a/b"), "127.0.0.1:5000");
        assert_eq!(registry_of("docker.io/library/busybox"), "docker.io");
    }
}
