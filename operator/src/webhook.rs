//! The validating admission webhook: cross-field rules the CRD schema cannot state.
//!
//! TLS uses a self-signed CA generated on first start and kept in a Secret, so that every
//! replica serves with the same certificate; the operator writes the CA into its
//! ValidatingWebhookConfiguration. Alternatively (`--webhook-cert-dir`, the chart's
//! cert-manager mode) the certificate comes from a mounted Secret that someone else issues
//! and renews, and the configuration and its CA bundle are theirs too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::{Json, Router, extract::State, routing::post};
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kernelflow_crds::validate::{self, FieldError};
use kernelflow_crds::{AsyncTrainingJob, KernelDeployment};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::de::DeserializeOwned;
use tower_http::timeout::TimeoutLayer;

use crate::FIELD_MANAGER;
use crate::metrics::Metrics;

mod capped;

/// Default name of the ValidatingWebhookConfiguration the operator owns.
pub const CONFIGURATION_NAME: &str = "kernelflow-validating-webhook";
/// Default name of the Secret holding the self-signed CA and serving certificate.
pub const SECRET_NAME: &str = "kernelflow-webhook-tls";
const PATH: &str = "/validate";

/// How the API server reaches the webhook.
#[derive(Clone, Debug)]
pub enum Target {
    /// A URL, for an operator outside the cluster (local runs).
    Url(String),
    /// A Service in the operator's namespace, port 443.
    Service { name: String, namespace: String },
}

impl Target {
    fn dns_names(&self) -> Vec<String> {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        match self {
            Target::Url(url) => {
                let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
                let authority = rest.split('/').next().unwrap_or_default();
                let host = match authority.strip_prefix('[') {
                    Some(v6) => v6.split(']').next().unwrap_or_default(),
                    None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
                };
                names.push(host.to_string());
            }
            Target::Service { name, namespace } => {
                for suffix in ["", ".svc", ".svc.cluster.local"] {
                    names.push(format!("{name}.{namespace}{suffix}"));
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

/// PEM-encoded TLS material of the webhook.
#[derive(Clone, Debug)]
pub struct Certificate {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// Reads the webhook's certificate from the Secret `name`, creating both on first start. When
/// replicas race, the first create wins and the others read what it stored.
pub async fn ensure_certificate(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    target: &Target,
) -> anyhow::Result<Certificate> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(found) = api.get_opt(name).await?.and_then(|s| from_secret(&s)) {
        return Ok(found);
    }
    let fresh = generate(&target.dns_names())?;
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.into());
    secret.type_ = Some("kubernetes.io/tls".into());
    secret.data = Some(
        [
            ("ca.crt", &fresh.ca),
            ("tls.crt", &fresh.cert),
            ("tls.key", &fresh.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect(),
    );
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(fresh),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let stored = api.get(name).await?;
            from_secret(&stored).ok_or_else(|| {
                anyhow::anyhow!("Secret {namespace}/{name} lacks ca.crt, tls.crt or tls.key")
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn from_secret(s: &Secret) -> Option<Certificate> {
    let data = s.data.as_ref()?;
    let get = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Certificate {
        ca: get("ca.crt")?,
        cert: get("tls.crt")?,
        key: get("tls.key")?,
    })
}

fn generate(dns_names: &[String]) -> anyhow::Result<Certificate> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kernelflow webhook CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kernelflow-webhook");
    let cert = params.signed_by(&key, &ca)?;
    Ok(Certificate {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes the ValidatingWebhookConfiguration `name` (server-side apply) with the CA bundle.
pub async fn register(
    client: &kube::Client,
    name: &str,
    target: &Target,
    ca_pem: &str,
) -> anyhow::Result<()> {
    let client_config = match target {
        Target::Url(url) => {
            serde_json::json!({ "url": format!("{}{PATH}", url.trim_end_matches('/')) })
        }
        Target::Service { name, namespace } => {
            serde_json::json!({ "service": { "name": name, "namespace": namespace, "path": PATH, "port": 443 } })
        }
    };
    let mut client_config = client_config;
    client_config["caBundle"] = serde_json::Value::String(base64(ca_pem.as_bytes()));
    let webhook = |name: &str, resource: &str| {
        serde_json::json!({
            "name": name,
            "clientConfig": client_config,
            "rules": [{
                "apiGroups": [kernelflow_crds::GROUP], "apiVersions": ["v1alpha1"],
                "operations": ["CREATE", "UPDATE"], "resources": [resource], "scope": "Namespaced"
            }],
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5
        })
    };
    let vwc = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [
            webhook("kerneldeployments.kernelflow.dev", "kerneldeployments"),
            webhook("asynctrainingjobs.kernelflow.dev", "asynctrainingjobs"),
        ]
    });
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(vwc),
    )
    .await?;
    Ok(())
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Serves the webhook over TLS until the task is dropped.
pub async fn serve(addr: SocketAddr, cert: &Certificate, metrics: Metrics) -> anyhow::Result<()> {
    let tls = RustlsConfig::from_config(tls_config(&cert.cert, &cert.key)?);
    serve_tls(addr, tls, metrics).await
}

/// How long a client has to send a request's head, from its connection's start or the end
/// of its last request: a connection that sends nothing would otherwise hold a socket and a
/// task for good. Longer than the 90 s for which the API server's (Go's) client keeps an
/// idle connection, so that it is never closed under a request about to reuse it.
const HEAD_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 120 });

/// How long a request may take once its head is in, its body included: the API server
/// gives up on a webhook after 30 s at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 30 });

/// Connections held at once; a new one past them is closed at once. The API servers need a
/// few each.
const MAX_CONNECTIONS: usize = if cfg!(test) { 8 } else { 1024 };

/// [`MAX_CONNECTIONS`], or half the file descriptors this process may open where that is
/// fewer, so that a flood of connections leaves room for the rest of the operator.
fn max_connections() -> usize {
    use rustix::process::{Resource, getrlimit};
    let open_files = getrlimit(Resource::Nofile).current;
    let half = open_files.map_or(usize::MAX, |n| usize::try_from(n / 2).unwrap_or(usize::MAX));
    MAX_CONNECTIONS.min(half).max(1)
}

/// The TLS configuration for a certificate chain and key (PEM), offering HTTP/1.1 alone:
/// the server speaks nothing else, so that [`HEAD_TIMEOUT`] holds from the first byte
/// (serving both, it would wait without a limit for bytes to tell them apart).
fn tls_config(cert: &str, key: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn serve_tls(addr: SocketAddr, tls: RustlsConfig, metrics: Metrics) -> anyhow::Result<()> {
    let refused = metrics.webhook_connections_refused.clone();
    let app = Router::new()
        .route(PATH, post(review))
        // A 408 past it, as for a request whose body trickles in.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(metrics);
    let mut server = axum_server::bind_rustls(addr, tls)
        .map(|tls| capped::Capped::new(tls, max_connections(), refused))
        .http1_only();
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    server.serve(app.into_make_service()).await?;
    Ok(())
}

/// The serving certificate and key (PEM) of a mounted `kubernetes.io/tls` Secret.
pub fn read_cert_dir(dir: &Path) -> anyhow::Result<(String, String)> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
    };
    Ok((read("tls.crt")?, read("tls.key")?))
}

/// Serves the webhook with the certificate in `dir`, checking it every `period` and serving
/// a renewed one from then on (cert-manager renews in place; the kubelet updates the mount).
pub async fn serve_cert_dir(
    addr: SocketAddr,
    dir: &Path,
    period: Duration,
    metrics: Metrics,
) -> anyhow::Result<()> {
    let current = read_cert_dir(dir)?;
    let tls = RustlsConfig::from_config(tls_config(&current.0, &current.1)?);
    tokio::select! {
        r = serve_tls(addr, tls.clone(), metrics) => r,
        never = reload(dir, period, current, &tls) => match never {},
    }
}

async fn reload(
    dir: &Path,
    period: Duration,
    mut current: (String, String),
    tls: &RustlsConfig,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(period).await;
        // A read between the kubelet's writes fails or mismatches: keep serving the old pair
        // and look again next period.
        let Ok(fresh) = read_cert_dir(dir) else {
            continue;
        };
        if fresh == current {
            continue;
        }
        match tls_config(&fresh.0, &fresh.1) {
            Ok(config) => {
                tls.reload_from_config(config);
                tracing::info!(dir = %dir.display(), "webhook certificate reloaded");
            }
            // Warned once per change; the previous certificate keeps serving.
            Err(e) => tracing::warn!(error = %e, "the new webhook certificate is unusable"),
        }
        current = fresh;
    }
}

async fn review(
    State(metrics): State<Metrics>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    // Labelled by what the webhook is registered for: the kind comes from the request, and
    // any client that reaches the service could send a new one each time.
    let kind = match request.kind.kind.as_str() {
        k @ ("KernelDeployment" | "AsyncTrainingJob") => k,
        _ => "other",
    };
    let response = admit(&request);
    metrics
        .admission_reviews
        .with_label_values(&[kind, &response.allowed.to_string()])
        .inc();
    Json(response.into_review())
}

/// The verdict on one admission request.
pub fn admit(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(object) = request
        .object
        .as_ref()
        .filter(|_| matches!(request.operation, Operation::Create | Operation::Update))
    else {
        return response;
    };
    // An update is judged on what it changes. One that leaves spec and annotations alone
    // (the controller adding or removing its finalizer) passes unread, even for an object
    // that today's rules, or today's types, would refuse: else it could never get its
    // condition, nor finish deleting.
    if let Some(old) = &request.old_object
        && old.data.get("spec") == object.data.get("spec")
        && old.metadata.annotations == object.metadata.annotations
    {
        return response;
    }
    // A stored object that no longer deserializes is judged as a create, so that it can be
    // mended, but what no update may change is compared raw.
    let verdict = match request.kind.kind.as_str() {
        "KernelDeployment" => typed::<KernelDeployment>(object).and_then(|kd| {
            let old = request.old_object.as_ref();
            let conv2d = |spec: &serde_json::Value| spec.pointer("/kernel/conv2d").cloned();
            let old = readable::<KernelDeployment>(old, object, "spec.kernel.conv2d", conv2d)?;
            ratchet(
                validate::kernel_deployment(&kd.spec),
                old.as_ref().map(|o| validate::kernel_deployment(&o.spec)),
            )?;
            ratchet(
                validate::action_annotation(kd.annotations()),
                old.as_ref()
                    .map(|o| validate::action_annotation(o.annotations())),
            )?;
            match old {
                Some(old) => validate::kernel_deployment_update(&old.spec, &kd.spec),
                None => Ok(()),
            }
        }),
        "AsyncTrainingJob" => typed::<AsyncTrainingJob>(object).and_then(|j| {
            let old = request.old_object.as_ref();
            let fixed = |spec: &serde_json::Value| {
                let mut spec = spec.clone();
                spec.as_object_mut()?.remove("runPolicy");
                Some(spec)
            };
            let old = readable::<AsyncTrainingJob>(old, object, "spec", fixed)?;
            ratchet(
                validate::training_job(&j.spec),
                old.as_ref().map(|o| validate::training_job(&o.spec)),
            )?;
            match old {
                Some(old) => validate::training_job_update(&old.spec, &j.spec),
                None => Ok(()),
            }
        }),
        _ => Ok(()),
    };
    match verdict {
        Ok(()) => response,
        Err(errors) => response.deny(validate::describe(&errors)),
    }
}

/// The stored object, typed; `None` when there is none, or when it no longer deserializes
/// and the update leaves `fixed` (the part of the spec no update may change) as it was.
fn readable<K: DeserializeOwned>(
    old: Option<&DynamicObject>,
    new: &DynamicObject,
    field: &str,
    fixed: impl Fn(&serde_json::Value) -> Option<serde_json::Value>,
) -> Result<Option<K>, Vec<FieldError>> {
    let Some(old) = old else { return Ok(None) };
    if let Ok(old) = typed(old) {
        return Ok(Some(old));
    }
    let part = |o: &DynamicObject| o.data.get("spec").and_then(&fixed);
    if part(old) == part(new) {
        Ok(None)
    } else {
        Err(vec![FieldError {
            field: field.into(),
            message: "cannot change once the object exists".into(),
        }])
    }
}

/// The errors of the new object that the old one (if any) did not have already. A flaw left
/// where it stands passes, as Kubernetes ratchets CRD schema validation: else an object that
/// today's rules refuse could not be paused, suspended or mended one field at a time.
fn ratchet(
    new: Result<(), Vec<FieldError>>,
    old: Option<Result<(), Vec<FieldError>>>,
) -> Result<(), Vec<FieldError>> {
    let old = old.and_then(Result::err).unwrap_or_default();
    let errors = new.err().unwrap_or_default();
    let fresh: Vec<_> = errors.into_iter().filter(|e| !old.contains(e)).collect();
    if fresh.is_empty() { Ok(()) } else { Err(fresh) }
}

fn typed<K: DeserializeOwned>(object: &DynamicObject) -> Result<K, Vec<FieldError>> {
    let value = serde_json::to_value(object).map_err(|e| {
        vec![FieldError {
            field: "object".into(),
            message: e.to_string(),
        }]
    })?;
    // The path of what does not read, as the rules' own errors name their fields.
    serde_path_to_error::deserialize(value).map_err(|e| {
        vec![FieldError {
            field: e.path().to_string(),
            message: e.into_inner().to_string(),
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(object: serde_json::Value) -> AdmissionRequest<DynamicObject> {
        update(object, serde_json::Value::Null)
    }

    /// A CREATE of `object`, or an UPDATE from `old` when it is not null.
    fn update(
        object: serde_json::Value,
        old: serde_json::Value,
    ) -> AdmissionRequest<DynamicObject> {
        review_of(object, old).try_into().unwrap()
    }

    fn review_of(
        object: serde_json::Value,
        old: serde_json::Value,
    ) -> AdmissionReview<DynamicObject> {
        let operation = if old.is_null() { "CREATE" } else { "UPDATE" };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1", "operation": operation, "userInfo": {},
                "kind": {"group": "kernelflow.dev", "version": "v1alpha1", "kind": object["kind"]},
                "resource": {"group": "kernelflow.dev", "version": "v1alpha1", "resource": "x"},
                "object": object, "oldObject": old
            }
        }))
        .unwrap()
    }

    /// Reviews are counted by the kinds the webhook is for; any other is "other", so that
    /// requests cannot mint series.
    #[tokio::test]
    async fn reviews_are_counted_by_a_closed_set_of_kinds() {
        let metrics = Metrics::default();
        for kind in ["AsyncTrainingJob", "Made-Up-1", "Made-Up-2"] {
            let object = serde_json::json!({"kind": kind, "metadata": {"name": "x"}});
            let review = review_of(object, serde_json::Value::Null);
            let Json(answer) = super::review(State(metrics.clone()), Json(review)).await;
            assert!(answer.response.is_some(), "{kind}");
        }
        let text = metrics.render();
        assert!(text.contains("kind=\"AsyncTrainingJob\""), "{text}");
        assert!(
            text.contains("admission_reviews_total{allowed=\"true\",kind=\"other\"} 2"),
            "{text}"
        );
        assert!(!text.contains("Made-Up"), "{text}");
    }

    fn job(steps: u64, suspend: bool) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "AsyncTrainingJob", "metadata": {"name": "j"},
            "spec": {
                "model": {"layers": [{"name": "a", "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}}]},
                "data": {"synthetic": {"shape": [1, 2, 2], "samples": 2}},
                "training": {"batchSize": 1, "steps": steps, "learningRate": 0.1},
                "placement": {"nodeSelector": {}},
                "runPolicy": {"suspend": suspend}
            }
        })
    }

    #[test]
    fn a_training_job_may_change_only_its_run_policy() {
        assert!(admit(&update(job(10, true), job(10, false))).allowed);
        let denied = admit(&update(job(20, false), job(10, false)));
        assert!(!denied.allowed);
        assert!(
            denied
                .result
                .message
                .starts_with("spec.training: cannot change once the job exists"),
            "{}",
            denied.result.message
        );
        assert!(admit(&request(job(20, false))).allowed);
    }

    fn kd(steps: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment", "metadata": {"name": "k"},
            "spec": {
                "kernel": {"artifact": {"url": "file:///k", "sha256": "a".repeat(64)},
                           "conv2d": {"inChannels": 2, "outChannels": 2, "kernelSize": [1, 1]}},
                "nodeSelector": {}, "rollout": {"steps": steps}
            }
        })
    }

    #[test]
    fn denies_with_the_field_and_allows_valid_objects() {
        let denied = admit(&request(kd(serde_json::json!([{"trafficPercent": 20}]))));
        assert!(!denied.allowed);
        assert_eq!(
            denied.result.message,
            "spec.rollout.steps[0].trafficPercent: the last step must be 100, not 20"
        );
        let allowed = admit(&request(kd(
            serde_json::json!([{"trafficPercent": 20}, {"trafficPercent": 100}]),
        )));
        assert!(allowed.allowed, "{:?}", allowed.result);
        // What does not deserialize is named too.
        let unreadable = kd(serde_json::json!([{"trafficPercent": 100, "pause": "1234567890s"}]));
        let denied = admit(&request(unreadable));
        assert!(
            denied.result.message.starts_with(
                "spec.rollout.steps[0].pause: duration \"1234567890s\" is out of range"
            ),
            "{}",
            denied.result.message
        );
    }

    #[test]
    fn updates_keep_the_op_and_actions_name_a_verb() {
        let update = |old: serde_json::Value, new: serde_json::Value| {
            let mut r = request(new);
            r.operation = Operation::Update;
            r.old_object = Some(serde_json::from_value(old).unwrap());
            admit(&r)
        };
        let steps = serde_json::json!([{"trafficPercent": 100}]);
        let mut reshaped = kd(steps.clone());
        reshaped["spec"]["kernel"]["conv2d"]["outChannels"] = 4.into();
        let denied = update(kd(steps.clone()), reshaped);
        assert!(
            denied
                .result
                .message
                .starts_with("spec.kernel.conv2d: is immutable"),
            "{:?}",
            denied.result
        );
        let mut annotated = kd(steps.clone());
        annotated["metadata"]["annotations"] =
            serde_json::json!({"kernelflow.dev/action": "rollback"});
        let denied = update(kd(steps.clone()), annotated.clone());
        assert!(
            denied
                .result
                .message
                .contains("unknown action \"rollback\""),
            "{:?}",
            denied.result
        );
        annotated["metadata"]["annotations"]["kernelflow.dev/action"] = "abort:1".into();
        assert!(update(kd(steps), annotated).allowed);
    }

    #[test]
    fn an_update_that_leaves_the_spec_alone_passes_even_for_an_invalid_object() {
        let invalid = kd(serde_json::json!([{"trafficPercent": 20}]));
        let mut finalized = invalid.clone();
        finalized["metadata"]["finalizers"] = serde_json::json!(["kernelflow.dev/drain"]);
        let r = admit(&update(invalid.clone(), finalized.clone()));
        assert!(r.allowed, "{:?}", r.result);
        assert!(admit(&update(finalized, invalid.clone())).allowed);
        let mut changed = invalid.clone();
        changed["spec"]["rollout"]["steps"] = serde_json::json!([{"trafficPercent": 30}]);
        assert!(!admit(&update(invalid, changed)).allowed);

        let mut bad_job = job(10, false);
        bad_job["spec"]["data"]["synthetic"]["shape"] = serde_json::json!([0, 2, 2]);
        let mut finalized = bad_job.clone();
        finalized["metadata"]["finalizers"] = serde_json::json!(["kernelflow.dev/cleanup"]);
        assert!(admit(&update(finalized, bad_job.clone())).allowed);
        assert!(!admit(&request(bad_job)).allowed);
    }

    #[test]
    fn flaws_an_update_leaves_alone_do_not_block_it() {
        // A job that today's rules refuse (it predates them, or the webhook) can be suspended.
        let mut flawed = job(10, false);
        flawed["spec"]["training"]["momentum"] = 1.0.into();
        let mut suspended = flawed.clone();
        suspended["spec"]["runPolicy"]["suspend"] = true.into();
        let r = admit(&update(suspended, flawed.clone()));
        assert!(r.allowed, "{:?}", r.result);
        // A new flaw is still refused, and named alone.
        let mut worse = flawed.clone();
        worse["spec"]["runPolicy"]["activeDeadlineSeconds"] = 0.into();
        let r = admit(&update(worse, flawed));
        assert_eq!(
            r.result.message,
            "spec.runPolicy.activeDeadlineSeconds: must be at least 1 when set"
        );

        // A KernelDeployment with a flawed step can be paused.
        let flawed = kd(serde_json::json!([{"trafficPercent": 20}]));
        let mut paused = flawed.clone();
        paused["spec"]["paused"] = true.into();
        let r = admit(&update(paused, flawed.clone()));
        assert!(r.allowed, "{:?}", r.result);

        // A finalizer-only update passes even when the object no longer deserializes.
        let mut unreadable = flawed;
        unreadable["spec"]["rollout"]["steps"][0]["pause"] = "1".repeat(120).into();
        let mut finalized = unreadable.clone();
        finalized["metadata"]["finalizers"] = serde_json::json!([]);
        let r = admit(&update(finalized, unreadable.clone()));
        assert!(r.allowed, "{:?}", r.result);
        // Nor does it stop the object being mended, but what may not change stays.
        let mended = kd(serde_json::json!([{"trafficPercent": 100}]));
        let r = admit(&update(mended.clone(), unreadable.clone()));
        assert!(r.allowed, "{:?}", r.result);
        let mut reshaped = mended;
        reshaped["spec"]["kernel"]["conv2d"]["outChannels"] = 4.into();
        let r = admit(&update(reshaped, unreadable));
        assert_eq!(
            r.result.message,
            "spec.kernel.conv2d: cannot change once the object exists"
        );
    }

    #[test]
    fn certificates_cover_the_target() {
        let url = Target::Url("https://127.0.0.1:9443".into()).dns_names();
        assert_eq!(url, ["127.0.0.1", "localhost"]);
        let svc = Target::Service {
            name: "kf".into(),
            namespace: "sys".into(),
        }
        .dns_names();
        assert!(svc.contains(&"kf.sys.svc".to_string()), "{svc:?}");
        let cert = generate(&svc).unwrap();
        assert!(cert.key.contains("PRIVATE KEY"));
        // The certificate, as a client trusting only the CA checks it: valid for the names
        // the API server dials, and for no other.
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert.ca.as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::from_pem_slice(cert.cert.as_bytes()).unwrap();
        let valid_for = |name: &str| {
            let name = ServerName::try_from(name.to_string()).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
                .is_ok()
        };
        assert!(valid_for("kf.sys.svc") && valid_for("kf.sys.svc.cluster.local"));
        assert!(!valid_for("other.sys.svc"));
    }

    /// A TLS connection to `addr` as `localhost`, trusting only `ca_pem` and offering h2 and
    /// HTTP/1.1, its handshake done.
    fn connect(
        addr: SocketAddr,
        ca_pem: &str,
    ) -> Result<(rustls::ClientConnection, std::net::TcpStream), String> {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut socket = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        while tls.is_handshaking() {
            tls.complete_io(&mut socket).map_err(|e| e.to_string())?;
        }
        Ok((tls, socket))
    }

    /// Completes a TLS handshake with `addr` as `localhost`, trusting only `ca_pem`.
    async fn handshake(addr: SocketAddr, ca_pem: String) -> Result<(), String> {
        tokio::task::spawn_blocking(move || connect(addr, &ca_pem).map(drop))
            .await
            .unwrap()
    }

    /// A local address nothing listens on.
    fn free_addr() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    /// What the server sends on `tls` until it hangs up; an error where it has not within
    /// ten times its limits (a server still waiting).
    fn until_closed(
        mut tls: rustls::ClientConnection,
        mut socket: std::net::TcpStream,
    ) -> Result<String, String> {
        use std::io::Read;
        socket
            .set_read_timeout(Some(HEAD_TIMEOUT.max(REQUEST_TIMEOUT) * 10))
            .unwrap();
        let mut got = Vec::new();
        loop {
            match tls.read_tls(&mut socket) {
                Ok(0) => break,
                Ok(_) => {
                    let state = tls.process_new_packets().map_err(|e| e.to_string())?;
                    let _ = tls.reader().read_to_end(&mut got);
                    if state.peer_has_closed() {
                        break;
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    }

    /// Where the server waits for bytes that never come, it hangs up, or answers 408 to a
    /// request whose body does not come; it speaks HTTP/1.1 alone, whatever a client offers.
    #[tokio::test]
    async fn slow_clients_are_let_go() {
        let cert = generate(&["localhost".to_string()]).unwrap();
        let addr = free_addr();
        let server = tokio::spawn({
            let cert = cert.clone();
            async move { serve(addr, &cert, Metrics::default()).await }
        });
        let ca = cert.ca.clone();
        let (alpn, silent, trickling) = tokio::task::spawn_blocking(move || {
            let open = || {
                (0..100)
                    .find_map(|_| {
                        connect(addr, &ca)
                            .inspect_err(|_| std::thread::sleep(Duration::from_millis(50)))
                            .ok()
                    })
                    .expect("the webhook does not serve")
            };
            let (tls, socket) = open();
            let alpn = tls.alpn_protocol().map(<[u8]>::to_vec);
            let silent = until_closed(tls, socket);
            let (mut tls, mut socket) = open();
            let head = "POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n";
            std::io::Write::write_all(&mut tls.writer(), head.as_bytes()).unwrap();
            tls.complete_io(&mut socket).unwrap();
            (alpn, silent, until_closed(tls, socket))
        })
        .await
        .unwrap();
        server.abort();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(
            silent,
            Ok(String::new()),
            "the silent connection stays open"
        );
        let answer = trickling.expect("the trickling connection stays open");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    /// Past `MAX_CONNECTIONS` held at once, a new connection is closed at once; connections
    /// let go make room again.
    #[tokio::test]
    async fn connections_past_the_cap_are_closed() {
        let cert = generate(&["localhost".to_string()]).unwrap();
        let addr = free_addr();
        let metrics = Metrics::default();
        let server = tokio::spawn({
            let (cert, metrics) = (cert.clone(), metrics.clone());
            async move { serve(addr, &cert, metrics).await }
        });
        let closed = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let connect = || {
                (0..100)
                    .find_map(|_| {
                        std::net::TcpStream::connect(addr)
                            .inspect_err(|_| std::thread::sleep(Duration::from_millis(50)))
                            .ok()
                    })
                    .expect("the webhook does not listen")
            };
            // Each waits for a TLS hello that does not come, holding its place.
            let sockets: Vec<_> = (0..=MAX_CONNECTIONS).map(|_| connect()).collect();
            let hung_up = |mut s: &std::net::TcpStream| {
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                match s.read(&mut [0u8; 1]) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            };
            let closed = || sockets.iter().filter(|s| hung_up(s)).count();
            (0..250).map(|_| closed()).find(|n| *n > 0).unwrap_or(0)
        })
        .await
        .unwrap();
        assert_eq!(closed, 1, "one past the cap is closed, the others held");
        assert_eq!(metrics.webhook_connections_refused.get(), 1);
        let mut served = false;
        for _ in 0..100 {
            if handshake(addr, cert.ca.clone()).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.abort();
        assert!(served, "connections let go did not make room");
    }

    #[tokio::test]
    async fn a_mounted_certificate_is_served_and_reloaded_when_renewed() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("kernelflow-certdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = read_cert_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("tls.crt"), "{err}");
        let write = |c: &Certificate| {
            std::fs::write(dir.join("tls.crt"), &c.cert).unwrap();
            std::fs::write(dir.join("tls.key"), &c.key).unwrap();
        };
        let names = ["localhost".to_string()];
        let (first, renewed) = (generate(&names).unwrap(), generate(&names).unwrap());
        write(&first);
        let addr = free_addr();
        let server = tokio::spawn({
            let dir = dir.clone();
            async move {
                serve_cert_dir(addr, &dir, Duration::from_millis(50), Metrics::default()).await
            }
        });
        let within = |ca: String| async move {
            for _ in 0..100 {
                if handshake(addr, ca.clone()).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        assert!(
            within(first.ca.clone()).await,
            "the mounted certificate is not served"
        );
        assert!(handshake(addr, renewed.ca.clone()).await.is_err());
        write(&renewed);
        assert!(
            within(renewed.ca.clone()).await,
            "the renewed certificate is not served"
        );
        assert!(handshake(addr, first.ca.clone()).await.is_err());
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
