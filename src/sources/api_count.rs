//! Counts every request the agent sends to the API server, by verb and resource, as it leaves the
//! client (a tower layer under kube's `Client`): the fleet's API cost is read from the agent itself
//! (`runner_warden_api_requests_total`), next to the API server's own `apiserver_request_total`.

use std::task::{Context, Poll};

use http::{Method, Request, Uri};
use prometheus::IntCounterVec;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct CountLayer {
    counter: IntCounterVec,
}

impl CountLayer {
    /// `counter` has the labels `verb` and `resource`.
    pub fn new(counter: IntCounterVec) -> Self {
        Self { counter }
    }
}

impl<S> Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            counter: self.counter.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Count<S> {
    inner: S,
    counter: IntCounterVec,
}

impl<S, B> Service<Request<B>> for Count<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (verb, resource) = classify(req.method(), req.uri());
        self.counter.with_label_values(&[verb, &resource]).inc();
        self.inner.call(req)
    }
}

/// The Kubernetes verb and resource (`resource/subresource` for a subresource) of a request, as the API
/// server's own `apiserver_request_total` names them; `other` for non-resource paths (`/version`).
pub fn classify(method: &Method, uri: &Uri) -> (&'static str, String) {
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return (verb_of(method, false, uri), "other".into()),
    };
    let (resource, name, sub) = match rest {
        ["namespaces", _ns, resource, name, sub, ..] => (*resource, Some(*name), Some(*sub)),
        ["namespaces", _ns, resource, name] => (*resource, Some(*name), None),
        ["namespaces", _ns, resource] => (*resource, None, None),
        [resource, name, sub, ..] => (*resource, Some(*name), Some(*sub)),
        [resource, name] => (*resource, Some(*name), None),
        [resource] => (*resource, None, None),
        [] => return (verb_of(method, false, uri), "other".into()),
    };
    let resource = match sub {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    (verb_of(method, name.is_some(), uri), resource)
}

fn verb_of(method: &Method, named: bool, uri: &Uri) -> &'static str {
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_and_resources_as_the_api_server_counts_them() {
        let c = |m: Method, u: &str| {
            let (v, r) = classify(&m, &u.parse().unwrap());
            format!("{v} {r}")
        };
        let cases = [
            (Method::GET, "/api/v1/namespaces/p1/secrets/pull", "get secrets"),
            (Method::GET, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1", "list pods"),
            (Method::GET, "/api/v1/pods?fieldSelector=x&watch=true&timeoutSeconds=290", "watch pods"),
            (Method::GET, "/api/v1/namespaces", "list namespaces"),
            (Method::GET, "/api/v1/namespaces/p1", "get namespaces"),
            (Method::GET, "/api/v1/nodes/n1", "get nodes"),
            (
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/rw/leases?fieldSelector=metadata.name%3Dx&watch=1",
                "watch leases",
            ),
            (Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/rw/leases/r", "update leases"),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/p1/events", "create events"),
            (
                Method::PATCH,
                "/apis/runner-warden.ambient-code.io/v1alpha1/noderunnerimages/n1/status",
                "patch noderunnerimages/status",
            ),
            (Method::DELETE, "/apis/g/v1/namespaces/a/things/x", "delete things"),
            (Method::DELETE, "/apis/g/v1/namespaces/a/things", "deletecollection things"),
            (Method::GET, "/version", "list other"),
        ];
        for (m, u, want) in cases {
            assert_eq!(c(m, u), want, "{u}");
        }
    }

    #[tokio::test]
    async fn the_layer_counts_each_request_once() {
        let counter =
            IntCounterVec::new(prometheus::Opts::new("t", "t"), &["verb", "resource"]).unwrap();
        let svc =
            tower::service_fn(|_req: Request<()>| async { Ok::<_, std::convert::Infallible>(()) });
        let mut svc = CountLayer::new(counter.clone()).layer(svc);
        use tower::ServiceExt;
        for _ in 0..3 {
            let req = Request::get("/api/v1/namespaces/a/secrets/s")
                .body(())
                .unwrap();
            svc.ready().await.unwrap().call(req).await.unwrap();
        }
        assert_eq!(counter.with_label_values(&["get", "secrets"]).get(), 3);
        assert_eq!(counter.with_label_values(&["list", "secrets"]).get(), 0);
    }
}
