//! The Helm chart: `helm lint` and `helm template` for every values set in
//! `charts/kernelflow/ci/`, a server-side dry run of each rendering (and of the examples),
//! `examples/install.yaml` in step with the chart, and `helm install` into the API server,
//! where the operator and the agent then run with the chart's ServiceAccounts and RBAC.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kernelflow_crds::{KernelDeployment, NodeReport};
use kernelflow_e2e::cluster::tool;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

use crate::{eventually, kernel_deployment, merged, setup};

const CHART: &str = "charts/kernelflow";
const WAIT: Duration = Duration::from_secs(60);

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Runs a tool from the workspace root with `stdin`; its stdout, or a panic with its output.
fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{} {} failed:\n{}{}",
        program.display(),
        args.join(" "),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn helm(args: &[&str]) -> String {
    run(&tool("helm").unwrap(), args, None)
}

/// The values files the chart is tested with: (set name, path from the workspace root).
fn values_sets() -> Vec<(String, String)> {
    let mut sets: Vec<(String, String)> = std::fs::read_dir(root().join(CHART).join("ci"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let name = file.strip_suffix("-values.yaml")?.to_string();
            Some((name, format!("{CHART}/ci/{file}")))
        })
        .collect();
    sets.sort();
    assert!(sets.len() >= 5, "values sets: {sets:?}");
    sets
}

/// The chart rendered by `helm template` with `values` and extra flags, as JSON objects.
fn render(release: &str, namespace: &str, values: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "-f",
        values,
    ];
    args.extend_from_slice(extra);
    documents(&helm(&args))
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Option<Value>>(doc).expect("valid YAML"))
        .collect()
}

/// The one object of `kind` whose name ends with `suffix`.
fn object<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    assert_eq!(found.len(), 1, "{kind} *{suffix}: {found:#?}");
    found[0]
}

fn kinds(objects: &[Value]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for o in objects {
        *kinds
            .entry(o["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    kinds
}

/// A container's environment as name → value (or the downward API field).
fn env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = e["value"]
                .as_str()
                .or_else(|| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
                .unwrap_or_default();
            (e["name"].as_str().unwrap().to_string(), value.to_string())
        })
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn the_chart_lints_and_renders_every_values_set() {
    for (set, values) in values_sets() {
        helm(&["lint", CHART, "--strict", "-f", &values]);
        let objects = render("kernelflow", "kernelflow-system", &values, &[]);
        let kinds = kinds(&objects);
        let deployment = object(&objects, "Deployment", "-operator");
        let daemonset = object(&objects, "DaemonSet", "-agent");
        let (operator, agent) = (
            container(deployment, "operator"),
            container(daemonset, "agent"),
        );
        let (operator_env, agent_env) = (env(operator), env(agent));

        // What holds whatever the values: non-root, read-only root, probes, identity.
        for workload in [deployment, daemonset] {
            let pod = &workload["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{set}");
            for c in pod["containers"].as_array().unwrap() {
                assert_eq!(
                    c["securityContext"]["readOnlyRootFilesystem"], true,
                    "{set}"
                );
                assert_eq!(
                    c["securityContext"]["allowPrivilegeEscalation"], false,
                    "{set}"
                );
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{set}");
            }
        }
        for c in [operator, agent] {
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{set}");
        }
        assert_eq!(agent_env["NODE_NAME"], "spec.nodeName", "{set}");
        assert_eq!(operator_env["POD_NAME"], "metadata.name", "{set}");
        let agent_rules = &object(&objects, "ClusterRole", "-agent")["rules"];
        assert_eq!(
            agent_rules,
            &json!([
                {"apiGroups": ["kernelflow.dev"], "resources": ["kerneldeployments", "asynctrainingjobs"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["kernelflow.dev"], "resources": ["nodereports"], "verbs": ["get", "create", "patch", "update", "delete"]},
            ]),
            "{set}: the agent's RBAC"
        );
        let operator_rules = &object(&objects, "ClusterRole", "-operator")["rules"];
        // The only deletion: finished training jobs past their time to live.
        for rule in operator_rules.as_array().unwrap() {
            if rule["verbs"].as_array().unwrap().contains(&json!("delete")) {
                assert_eq!(
                    rule["resources"],
                    json!(["asynctrainingjobs"]),
                    "{set}: {rule}"
                );
            }
        }
        let operator_grants = serde_json::to_string(
            &operator_rules
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["resources"] != json!(["asynctrainingjobs"]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let role_grants =
            serde_json::to_string(&object(&objects, "Role", "-operator")["rules"]).unwrap();
        assert!(
            !operator_grants.contains("secrets") && !operator_grants.contains("\"delete\""),
            "{set}: {operator_grants}"
        );

        let cert_manager = set.starts_with("cert-manager");
        assert_eq!(
            kinds.contains_key("ValidatingWebhookConfiguration"),
            cert_manager,
            "{set}"
        );
        assert_eq!(
            operator_env.contains_key("KERNELFLOW_WEBHOOK_CERT_DIR"),
            cert_manager,
            "{set}"
        );
        assert_eq!(
            operator_env.contains_key("KERNELFLOW_WEBHOOK_SERVICE"),
            !cert_manager,
            "{set}"
        );
        // Self-signed, the operator keeps its CA in a Secret and writes the configuration.
        assert_eq!(
            role_grants.contains("secrets"),
            !cert_manager,
            "{set}: {role_grants}"
        );
        assert_eq!(
            operator_grants.contains("validatingwebhookconfigurations"),
            !cert_manager,
            "{set}"
        );
        if cert_manager {
            let vwc = object(
                &objects,
                "ValidatingWebhookConfiguration",
                "-validating-webhook",
            );
            let cert = object(&objects, "Certificate", "-webhook");
            assert_eq!(
                vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                format!(
                    "kernelflow-system/{}",
                    cert["metadata"]["name"].as_str().unwrap()
                ),
                "{set}"
            );
            let mounted =
                &deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"];
            assert_eq!(mounted, &cert["spec"]["secretName"], "{set}");
            assert_eq!(
                kinds.contains_key("Issuer"),
                set == "cert-manager",
                "{set}: a CA of the chart's own only without issuerRef"
            );
        }

        // One monitor kind or the other, never both (each series scraped twice).
        let monitor = match set.as_str() {
            "cert-manager" => Some(("ServiceMonitor", "PodMonitor", "endpoints")),
            "cert-manager-issuer" => Some(("PodMonitor", "ServiceMonitor", "podMetricsEndpoints")),
            _ => None,
        };
        if let Some((kind, other, endpoints)) = monitor {
            assert_eq!(kinds[kind], 2, "{set}");
            assert!(!kinds.contains_key(other), "{set}");
            // The series' own `namespace`, `job` and `node` labels survive the scrape;
            // only an agent's series get the pod's node.
            for component in ["operator", "agent"] {
                let name = format!("kernelflow-{component}");
                let endpoint = &object(&objects, kind, &name)["spec"][endpoints][0];
                assert_eq!(endpoint["honorLabels"], true, "{kind} {name}");
                let relabeled = endpoint["relabelings"][0]["targetLabel"] == "node";
                assert_eq!(relabeled, component == "agent", "{kind} {name}");
            }
            let both = Command::new(tool("helm").unwrap())
                .current_dir(root())
                .args(["template", "kernelflow", CHART, "-f", &values])
                .args(["--set", "metrics.serviceMonitor.enabled=true"])
                .args(["--set", "metrics.podMonitor.enabled=true"])
                .output()
                .unwrap();
            let why = String::from_utf8_lossy(&both.stderr);
            assert!(!both.status.success() && why.contains("not both"), "{why}");
        }

        match set.as_str() {
            "default" => {
                assert_eq!(deployment["spec"]["replicas"], 2);
                assert_eq!(kinds["PodDisruptionBudget"], 1);
                let one = render(
                    "kernelflow",
                    "ns",
                    &values,
                    &["--set", "operator.replicas=1"],
                );
                assert!(
                    !self::kinds(&one).contains_key("PodDisruptionBudget"),
                    "one replica and a budget of one would block node drains"
                );
                assert_eq!(
                    daemonset["spec"]["template"]["spec"]["nodeSelector"],
                    json!({"nvidia.com/gpu.present": "true"})
                );
                assert_eq!(
                    daemonset["spec"]["template"]["spec"]["tolerations"][0]["key"],
                    "nvidia.com/gpu"
                );
                assert_eq!(agent["resources"]["limits"]["nvidia.com/gpu"], "1");
                assert_eq!(agent_env["KERNELFLOW_SHADOW_OPS_PER_SECOND"], "20");
                assert_eq!(agent_env["KERNELFLOW_SHADOW_CONCURRENCY"], "4");
                assert_eq!(agent_env["KERNELFLOW_OP_TIMEOUT_SECONDS"], "10");
                assert_eq!(agent_env["KERNELFLOW_CACHE_DIR"], "/var/cache/kernelflow");
                let volumes = &daemonset["spec"]["template"]["spec"]["volumes"];
                assert_eq!(volumes[0]["hostPath"]["path"], "/var/lib/kernelflow/cache");
                assert!(
                    !kinds.contains_key("ServiceMonitor") && !kinds.contains_key("PrometheusRule")
                );
            }
            "cert-manager" => {
                // The PrometheusRule is the plain rules file, runbook links re-pointed.
                let rule = object(&objects, "PrometheusRule", "kernelflow");
                let file =
                    std::fs::read_to_string(root().join(CHART).join("files/prometheus-rules.yaml"))
                        .unwrap()
                        .replace(
                            "https://github.com/kernelflow/kernelflow/blob/main/docs/operations.md",
                            "https://git.example/platform/kernelflow/docs/operations.md",
                        );
                assert_eq!(rule["spec"], serde_yaml::from_str::<Value>(&file).unwrap());
            }
            "runtime-class" => {
                let pod = &daemonset["spec"]["template"]["spec"];
                assert_eq!(pod["runtimeClassName"], "nvidia");
                assert!(agent["resources"]["limits"].get("nvidia.com/gpu").is_none());
                assert_eq!(agent_env["NVIDIA_VISIBLE_DEVICES"], "all");
                assert_eq!(agent_env["KERNELFLOW_SHADOW_OPS_PER_SECOND"], "0");
                assert_eq!(agent_env["AWS_REGION"], "eu-west-1");
                assert!(pod["volumes"][0]["emptyDir"].is_object(), "{pod}");
                assert!(pod.get("initContainers").is_none());
            }
            "small" => {
                assert_eq!(deployment["metadata"]["name"], "kf-operator");
                assert!(!kinds.contains_key("PodDisruptionBudget"));
                assert_eq!(operator_env["KERNELFLOW_WATCH_NAMESPACE"], "ml");
                assert_eq!(operator_env["KERNELFLOW_INSTALL_CRDS"], "true");
                assert_eq!(operator_env["KERNELFLOW_LEASE_NAME"], "kernelflow-ml");
                assert!(operator_grants.contains("customresourcedefinitions"));
                assert!(role_grants.contains("kernelflow-ml"), "{role_grants}");
            }
            _ => {}
        }
        if set != "small" {
            assert!(
                !operator_grants.contains("customresourcedefinitions"),
                "{set}"
            );
        }
    }
}

#[test]
fn every_value_is_documented_in_the_chart_readme() {
    let text = |rel: &str| std::fs::read_to_string(root().join(CHART).join(rel)).unwrap();
    let values: Value = serde_yaml::from_str(&text("values.yaml")).unwrap();
    let readme = text("README.md");
    fn leaves(path: Vec<String>, value: &Value, out: &mut Vec<Vec<String>>) {
        match value.as_object().filter(|m| !m.is_empty()) {
            Some(map) => {
                for (key, child) in map {
                    let mut deeper = path.clone();
                    deeper.push(key.clone());
                    leaves(deeper, child, out);
                }
            }
            None => out.push(path),
        }
    }
    let mut all = Vec::new();
    leaves(Vec::new(), &values, &mut all);
    // A value is documented by its own row or by a row for an object holding it
    // (`operator.resources`), not by a whole section (`operator`).
    let undocumented: Vec<String> = all
        .iter()
        .filter(|path| {
            !(path.len().min(2)..=path.len())
                .any(|k| readme.contains(&format!("`{}`", path[..k].join("."))))
        })
        .map(|path| path.join("."))
        .collect();
    assert!(
        undocumented.is_empty(),
        "values missing from {CHART}/README.md: {undocumented:?}"
    );
}

#[test]
fn install_yaml_is_the_chart_rendered() {
    let script = root().join("scripts/render-install-yaml.sh");
    let helm = tool("helm").unwrap();
    let rendered = Command::new(&script).env("HELM", &helm).output().unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let committed = std::fs::read(root().join("examples/install.yaml")).unwrap_or_default();
    assert!(
        committed == rendered.stdout,
        "examples/install.yaml is out of date with the chart; regenerate it with:\n\n    make install-yaml\n"
    );
    let objects = documents(&String::from_utf8(rendered.stdout).unwrap());
    let kinds = kinds(&objects);
    assert_eq!(kinds["Namespace"], 1);
    assert_eq!(kinds["CustomResourceDefinition"], 3);
    assert_eq!(kinds["Deployment"], 1);
    assert_eq!(kinds["DaemonSet"], 1);
}

/// Minimal stand-ins for cert-manager's and prometheus-operator's CRDs, created where the
/// cluster lacks them, so that the chart's optional objects can be stored. Their own schemas
/// are not checked here (`helm lint` and the template test look at their content).
async fn ensure_third_party_crds(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (group, kind, plural) in [
        ("cert-manager.io", "Certificate", "certificates"),
        ("cert-manager.io", "Issuer", "issuers"),
        ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
        ("monitoring.coreos.com", "PodMonitor", "podmonitors"),
        ("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
    ] {
        let name = format!("{plural}.{group}");
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "group": group, "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase()},
                "versions": [{"name": "v1", "served": true, "storage": true,
                              "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
            }
        }))
        .unwrap();
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating {name}: {e}"),
        }
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(WAIT, established)
            .await
            .unwrap()
            .unwrap();
    }
}

/// The API server's version for `helm template --kube-version`.
async fn kube_version(client: &kube::Client) -> String {
    let info = client.apiserver_version().await.unwrap();
    info.git_version.trim_start_matches('v').to_string()
}

#[tokio::test]
async fn rendered_manifests_and_examples_pass_a_server_side_dry_run() {
    let (env, client, ns) = setup("chart-dry").await;
    ensure_third_party_crds(&client).await;
    let version = kube_version(&client).await;
    let kubeconfig = env.plane.kubeconfig.to_str().unwrap();
    let kubectl = tool("kubectl").unwrap();
    for (set, values) in values_sets() {
        let manifests = helm(&[
            "template",
            &ns,
            CHART,
            "--namespace",
            &ns,
            "-f",
            &values,
            "--kube-version",
            &version,
        ]);
        let out = run(
            &kubectl,
            &[
                "--kubeconfig",
                kubeconfig,
                "apply",
                "--dry-run=server",
                "-f",
                "-",
            ],
            Some(&manifests),
        );
        assert!(out.contains("deployment.apps/"), "{set}: {out}");
    }
    // The examples pass the schema and the admission webhook.
    for example in [
        "examples/kerneldeployment.yaml",
        "examples/asynctrainingjob.yaml",
    ] {
        run(
            &kubectl,
            &[
                "--kubeconfig",
                kubeconfig,
                "apply",
                "--dry-run=server",
                "-n",
                &ns,
                "-f",
                example,
            ],
            None,
        );
    }
}

/// A kubeconfig for the control plane that authenticates as a ServiceAccount.
async fn service_account_kubeconfig(
    env: &kernelflow_e2e::env::Shared,
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> PathBuf {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .expect("a token")
        .token;
    let mut config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&env.plane.kubeconfig).unwrap()).unwrap();
    for user in config["users"].as_array_mut().unwrap() {
        user["user"] = json!({ "token": token });
    }
    let path = env.logs.join(format!("{ns}-{name}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

async fn client_for(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn the_chart_installs_and_its_service_accounts_run_the_operator_and_agent() {
    let (env, client, ns) = setup("chart").await;
    ensure_third_party_crds(&client).await;
    let kubeconfig = env.plane.kubeconfig.to_str().unwrap().to_string();
    let kubectl = tool("kubectl").unwrap();
    // Two releases in one namespace: the defaults, and cert-manager with monitoring.
    let releases = [
        (format!("{ns}-a"), format!("{CHART}/ci/default-values.yaml")),
        (
            format!("{ns}-b"),
            format!("{CHART}/ci/cert-manager-values.yaml"),
        ),
    ];
    for (release, values) in &releases {
        // The CRDs are the harness's already; Helm leaves existing ones alone either way.
        helm(&[
            "install",
            release,
            CHART,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns,
            "-f",
            values,
            "--skip-crds",
        ]);
        let manifest = helm(&[
            "get",
            "manifest",
            release,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns,
        ]);
        let created = run(
            &kubectl,
            &["--kubeconfig", &kubeconfig, "get", "-f", "-", "-o", "name"],
            Some(&manifest),
        );
        assert_eq!(
            created.lines().count(),
            documents(&manifest).len(),
            "{release}: every object of the manifest exists:\n{created}"
        );
    }

    // The chart's configuration (cert-manager mode) has the webhooks the operator registers.
    let live: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let operators = live.get("kernelflow-validating-webhook").await.unwrap();
    let charts = live
        .get(&format!("{ns}-b-kernelflow-validating-webhook"))
        .await
        .unwrap();
    let fields = |vwc: &ValidatingWebhookConfiguration| -> Vec<Value> {
        vwc.webhooks
            .iter()
            .flatten()
            .map(|w| {
                json!([
                    w.name,
                    w.rules,
                    w.admission_review_versions,
                    w.side_effects,
                    w.failure_policy,
                    w.timeout_seconds
                ])
            })
            .collect()
    };
    assert!(!fields(&operators).is_empty());
    assert_eq!(fields(&charts), fields(&operators));

    // The operator, as its ServiceAccount, leads, reconciles and records events.
    let fullname = format!("{ns}-a-kernelflow");
    let operator_kubeconfig =
        service_account_kubeconfig(env, &client, &ns, &format!("{fullname}-operator")).await;
    let lease = format!("{fullname}-operator");
    let operator = env
        .spawn_as(
            "kernelflow-operator",
            &format!("{ns}-operator"),
            &[
                "--namespace",
                &ns,
                "--watch-namespace",
                &ns,
                "--lease-name",
                &lease,
            ],
            &operator_kubeconfig,
        )
        .unwrap();
    let node = format!("{ns}-gpu");
    let nodes: Api<Node> = Api::all(client.clone());
    let labelled = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"pool": ns}}});
    nodes
        .patch(
            &node,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&labelled),
        )
        .await
        .unwrap();
    let agent_kubeconfig =
        service_account_kubeconfig(env, &client, &ns, &format!("{fullname}-agent")).await;
    let agent = env
        .spawn_as(
            "kernelflow-agent",
            &node,
            &["--node-name", &node, "--report-interval-seconds", "1"],
            &agent_kubeconfig,
        )
        .unwrap();
    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), &ns);
    let kd = merged(
        kernel_deployment("rbac"),
        // Only this test's node: others' tests count the nodes their deployments select.
        json!({"spec": {"nodeSelector": {"matchLabels": {"pool": ns, "nvidia.com/gpu.present": null}}}}),
    );
    kds.create(&PostParams::default(), &serde_json::from_value(kd).unwrap())
        .await
        .unwrap();

    let logs = || format!("{}\n{}", operator.log_tail(), agent.log_tail());
    eventually(
        WAIT,
        "the operator to accept the KernelDeployment",
        || async {
            let kd = kds.get("rbac").await.ok()?;
            let accepted = kd
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "True");
            (accepted && kd.metadata.finalizers.is_some_and(|f| !f.is_empty())).then_some(())
        },
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = leases
        .get(&lease)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity);
    assert!(holder.is_some(), "no Lease holder\n{}", logs());
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(WAIT, "an Event about the KernelDeployment", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rbac"))
            .then_some(())
    })
    .await;
    // The agent, as its ServiceAccount, sees the KernelDeployment and reports on it.
    let reports: Api<NodeReport> = Api::all(client.clone());
    eventually(
        WAIT,
        "the agent's NodeReport naming the KernelDeployment",
        || async {
            let report = reports.get(&node).await.ok()?;
            report
                .spec
                .kernels
                .iter()
                .any(|k| k.namespace == ns && k.name == "rbac")
                .then_some(())
        },
    )
    .await;

    // What the webhook code needs when self-signed, through the same authorization (dry runs).
    let as_operator = client_for(&operator_kubeconfig).await;
    let secrets: Api<Secret> = Api::namespaced(as_operator.clone(), &ns);
    let secret_name = format!("{fullname}-webhook-tls");
    assert!(secrets.get_opt(&secret_name).await.unwrap().is_none());
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": secret_name}})).unwrap();
    secrets
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &secret,
        )
        .await
        .unwrap();
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(as_operator.clone());
    let own = format!("{fullname}-validating-webhook");
    let empty = |name: &str| json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration", "metadata": {"name": name}});
    vwcs.patch(
        &own,
        &PatchParams::apply("kernelflow-operator").dry_run(),
        &Patch::Apply(empty(&own)),
    )
    .await
    .unwrap();
    // And nothing beyond.
    forbidden(
        vwcs.patch(
            "someone-elses",
            &PatchParams::apply("x").dry_run(),
            &Patch::Apply(empty("someone-elses")),
        )
        .await,
        "operator patches another webhook configuration",
    );
    forbidden(
        secrets.list(&ListParams::default()).await,
        "operator lists Secrets",
    );
    forbidden(
        Api::<KernelDeployment>::namespaced(as_operator, &ns)
            .delete(
                "rbac",
                &DeleteParams {
                    dry_run: true,
                    ..Default::default()
                },
            )
            .await,
        "operator deletes a KernelDeployment",
    );
    let as_agent = client_for(&agent_kubeconfig).await;
    forbidden(
        Api::<KernelDeployment>::namespaced(as_agent.clone(), &ns)
            .patch(
                "rbac",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": true}})),
            )
            .await,
        "agent patches a KernelDeployment",
    );
    forbidden(
        Api::<Secret>::namespaced(as_agent.clone(), &ns)
            .list(&ListParams::default())
            .await,
        "agent lists Secrets",
    );
    forbidden(
        Api::<Event>::namespaced(as_agent, &ns)
            .list(&ListParams::default())
            .await,
        "agent lists Events",
    );

    // The finalizer goes with the operator's help; then the releases.
    kds.delete("rbac", &DeleteParams::default()).await.unwrap();
    eventually(WAIT, "the KernelDeployment to be finalized", || async {
        kds.get_opt("rbac").await.ok()?.is_none().then_some(())
    })
    .await;
    for (release, _) in &releases {
        helm(&[
            "uninstall",
            release,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns,
        ]);
    }
    nodes.delete(&node, &DeleteParams::default()).await.unwrap();
}
