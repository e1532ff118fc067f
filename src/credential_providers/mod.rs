//! The node's image credential provider plugins (KEP-2133), run as kubelet runs them, so images kubelet
//! pulls with no pull secret (ECR, Artifact Registry, ACR) are prewarmed with the same credentials.
//!
//! - `config`: the `CredentialProviderConfig` file, validated at start-up.
//! - `plugin`: one run of a plugin (request on stdin, answer on stdout; bounded in time and size).
//! - `cache`: one provider's answers by image, registry or globally, for as long as the answer says.
//!
//! `CredentialProviders::lookup` is kubelet's external provider keyring (`Lookup` in
//! `pkg/credentialprovider/plugin`): every provider whose `matchImages` match the image, in the config
//! file's order (kubelet since 1.33; before, by name), each
//! answered from its cache or by one run of its plugin, every answer's logins merged into one keyring
//! matched against the image again, most specific key first and, for equal keys, the earlier
//! provider first. A provider that fails is reported (`ProviderCall::Failed`) and
//! contributes nothing; the pull goes on with the other credentials. docs/credential-providers.md.

pub mod cache;
pub mod config;
pub mod plugin;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::credentials::{urls_match, Credential, Keyring};
use cache::{registry_of, Cache};
pub use config::{ProviderConfig, ProvidersSettings};
use plugin::{Logins, PluginError};

/// What asking one provider came to.
#[derive(Debug)]
pub enum ProviderCall {
    /// Answered from its cache.
    Cached,
    /// Its plugin ran and answered.
    Answered,
    /// Its plugin ran and failed; it gave nothing.
    Failed(PluginError),
}

/// The credentials the providers give for one image, with what each provider did.
#[derive(Debug, Default)]
pub struct Lookup {
    /// Every login of every answer that matches the image, most specific first.
    pub logins: Vec<Credential>,
    /// Each provider whose `matchImages` matched, with what asking it came to.
    pub calls: Vec<(String, ProviderCall)>,
}

struct Provider {
    config: ProviderConfig,
    cache: Mutex<Cache>,
    /// One run at a time per registry: a second image of the same registry waits for the first's answer
    /// and, with `cacheKeyType: Registry` or `Global`, takes it from the cache (kubelet's singleflight is
    /// keyed by image, so it runs the plugin once per image in such a burst).
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct CredentialProviders {
    bin_dir: PathBuf,
    timeout: Duration,
    providers: Vec<Provider>,
}

impl CredentialProviders {
    pub fn new(settings: &ProvidersSettings) -> Self {
        // A provider that wants a pod's service account token cannot be served (docs/credential-providers.md;
        // the agent says so at start).
        let configs: Vec<ProviderConfig> = settings
            .providers
            .iter()
            .filter(|p| !p.wants_pod_token)
            .cloned()
            .collect();
        let now = Instant::now().into_std();
        Self {
            bin_dir: settings.bin_dir.clone(),
            timeout: settings.timeout,
            providers: configs
                .into_iter()
                .map(|config| Provider {
                    config,
                    cache: Mutex::new(Cache::new(now)),
                    flights: Mutex::default(),
                })
                .collect(),
        }
    }

    /// The providers' credentials for `image` (`registry/repository`, what kubelet hands its plugins).
    pub async fn lookup(&self, image: &str) -> Lookup {
        let mut calls = Vec::new();
        let mut answers: Vec<Arc<Logins>> = Vec::new();
        for p in &self.providers {
            if !p.config.match_images.iter().any(|m| urls_match(m, image)) {
                continue;
            }
            let (call, logins) = self.ask(p, image).await;
            calls.push((p.config.name.clone(), call));
            answers.extend(logins);
        }
        let ring = Keyring::from_logins(answers.iter().flat_map(|a| a.0.iter().cloned()));
        Lookup {
            logins: ring.lookup(image).into_iter().cloned().collect(),
            calls,
        }
    }

    async fn ask(&self, p: &Provider, image: &str) -> (ProviderCall, Option<Arc<Logins>>) {
        let cached = |p: &Provider| {
            p.cache
                .lock()
                .expect("cache lock")
                .get(image, Instant::now().into_std())
        };
        if let Some(l) = cached(p) {
            return (ProviderCall::Cached, Some(l));
        }
        let registry = registry_of(image).to_string();
        let flight = p
            .flights
            .lock()
            .expect("flights lock")
            .entry(registry.clone())
            .or_default()
            .clone();
        let result = {
            let _running = flight.lock().await;
            match cached(p) {
                Some(l) => (ProviderCall::Cached, Some(l)),
                None => match plugin::run(&self.bin_dir, &p.config, image, self.timeout).await {
                    Ok(answer) => {
                        let logins = Arc::new(answer.logins);
                        let ttl = answer.duration.unwrap_or(p.config.default_cache_duration);
                        p.cache.lock().expect("cache lock").put(
                            image,
                            answer.key_type,
                            logins.clone(),
                            ttl,
                            Instant::now().into_std(),
                        );
                        (ProviderCall::Answered, Some(logins))
                    }
                    Err(e) => (ProviderCall::Failed(e), None),
                },
            }
        };
        // The last one out removes the registry's entry: the map holds only registries in flight.
        let mut flights = p.flights.lock().expect("flights lock");
        drop(flight);
        if flights
            .get(&registry)
            .is_some_and(|f| Arc::strong_count(f) == 1)
        {
            flights.remove(&registry);
        }
        result
    }
}

#[cfg(test)]
mod tests;
