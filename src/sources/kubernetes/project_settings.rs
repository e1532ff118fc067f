//! ProjectSettings: the `vteam.ambient-code/v1alpha1` type (only the fields runner-warden reads) and the
//! reflector that follows every namespace's object (managed fields stripped). One watch for the whole
//! cluster: its cost does not grow with the projects beyond the objects themselves.

use std::borrow::Cow;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::report::health::ApiHealth;
use crate::sources::retry::WatchRetry;

pub const PROJECT_SETTINGS_NAME: &str = "projectsettings";

/// `vteam.ambient-code/v1alpha1` ProjectSettings, with only the fields runner-warden reads.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ProjectSettings {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ProjectSettingsSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSettingsSpec {
    #[serde(default)]
    pub runner_image: Option<String>,
    #[serde(default)]
    pub runner_image_pull_secret: Option<String>,
}

impl Resource for ProjectSettings {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ProjectSettings".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "vteam.ambient-code".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "projectsettings".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Keeps `writer`'s store equal to the cluster's ProjectSettings until `stop`; `changed` is sent after
/// every answer (the source reconciles on it).
pub(super) fn reflect(
    client: Client,
    writer: reflector::store::Writer<ProjectSettings>,
    changed: watch::Sender<()>,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let api: Api<ProjectSettings> = Api::all(client);
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={PROJECT_SETTINGS_NAME}")),
    )
    .modify(|ps: &mut ProjectSettings| {
        ps.managed_fields_mut().clear();
    })
    .reflect(writer);
    let mut retry = WatchRetry::new("ProjectSettings", api_health);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => {
                        // `Init` comes before the list request: not an answer.
                        if !matches!(ev, watcher::Event::Init) {
                            retry.answered();
                        }
                        let _ = changed.send(());
                    }
                    Some(Err(e)) => if !retry.pause(&e, &stop).await { return },
                    None => return,
                }
            }
        }
    })
}

/// uid of the regarded ProjectSettings from the cache (Pods carry theirs from CRI's labels).
pub fn project_uid(store: &Store<ProjectSettings>, namespace: &str) -> Option<String> {
    store
        .get(&reflector::ObjectRef::new(PROJECT_SETTINGS_NAME).within(namespace))
        .and_then(|o| o.uid())
}
