//! Malformed resources are rejected, by the CRD schema or the admission webhook, with a
//! message that names the field; valid ones and the examples are accepted.

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use crate::{kernel_deployment, merged, setup, training_job, yaml};

struct Case {
    what: &'static str,
    patch: &'static str,
    /// Every string must appear in the API server's message.
    expect: &'static [&'static str],
}

const KERNEL_DEPLOYMENT_CASES: &[Case] = &[
    // Enforced by the CRD schema.
    Case {
        what: "missing digest",
        patch: "{spec: {kernel: {artifact: {sha256: null}}}}",
        expect: &["spec.kernel.artifact.sha256", "Required value"],
    },
    Case {
        what: "uppercase digest",
        patch: "{spec: {kernel: {artifact: {sha256: ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB}}}}",
        expect: &["spec.kernel.artifact.sha256", "should match"],
    },
    Case {
        what: "ftp URL",
        patch: "{spec: {kernel: {artifact: {url: 'ftp://host/k'}}}}",
        expect: &["spec.kernel.artifact.url", "should match"],
    },
    Case {
        what: "traffic over 100",
        patch: "{spec: {rollout: {steps: [{trafficPercent: 150}]}}}",
        expect: &["trafficPercent", "less than or equal to 100"],
    },
    Case {
        what: "unknown dtype",
        patch: "{spec: {kernel: {conv2d: {dtype: f64}}}}",
        expect: &["spec.kernel.conv2d.dtype", "Unsupported value", "f32"],
    },
    Case {
        what: "empty stream pool",
        patch: "{spec: {flags: {streamPoolSize: 0}}}",
        expect: &["spec.flags.streamPoolSize", "greater than or equal to 1"],
    },
    Case {
        what: "too many ops in flight",
        patch: "{spec: {flags: {maxConcurrentOps: 5000}}}",
        expect: &["spec.flags.maxConcurrentOps", "less than or equal to 4096"],
    },
    Case {
        what: "one-number kernel size",
        patch: "{spec: {kernel: {conv2d: {kernelSize: [3]}}}}",
        expect: &["spec.kernel.conv2d.kernelSize", "at least 2 items"],
    },
    Case {
        what: "channels as text",
        patch: "{spec: {kernel: {conv2d: {inChannels: four}}}}",
        expect: &["spec.kernel.conv2d.inChannels", "integer"],
    },
    Case {
        what: "pause not a duration",
        patch: "{spec: {rollout: {steps: [{trafficPercent: 100, pause: soon}]}}}",
        expect: &["pause", "should match"],
    },
    Case {
        what: "success rate over 1",
        patch: "{spec: {rollout: {analysis: {minSuccessRate: 1.5}}}}",
        expect: &[
            "spec.rollout.analysis.minSuccessRate",
            "less than or equal to 1",
        ],
    },
    Case {
        what: "no node selector",
        patch: "{spec: {nodeSelector: null}}",
        expect: &["spec.nodeSelector", "Required value"],
    },
    // Enforced by the admission webhook.
    Case {
        what: "steps not increasing",
        patch: "{spec: {rollout: {steps: [{trafficPercent: 50}, {trafficPercent: 10}, {trafficPercent: 100}]}}}",
        expect: &[
            "denied the request",
            "spec.rollout.steps[1].trafficPercent: must be greater than the previous step's 50",
        ],
    },
    Case {
        what: "last step below 100",
        patch: "{spec: {rollout: {steps: [{trafficPercent: 1}, {trafficPercent: 50}]}}}",
        expect: &["spec.rollout.steps[1].trafficPercent: the last step must be 100, not 50"],
    },
    Case {
        what: "groups not dividing channels",
        patch: "{spec: {kernel: {conv2d: {groups: 3}}}}",
        expect: &["spec.kernel.conv2d.groups: 3 groups do not divide inChannels 64"],
    },
    Case {
        what: "kernel larger than the input",
        patch: "{spec: {kernel: {inputSize: [4, 4], conv2d: {kernelSize: [7, 7], padding: [0, 0]}}}}",
        expect: &["spec.kernel.conv2d: kernel [7, 7]", "output would be empty"],
    },
    Case {
        what: "relative file URL",
        patch: "{spec: {kernel: {artifact: {url: 'file://k.safetensors'}}}}",
        expect: &["spec.kernel.artifact.url: a file URL needs an absolute path"],
    },
    Case {
        what: "s3 URL without a key",
        patch: "{spec: {kernel: {artifact: {url: 's3://bucket'}}}}",
        expect: &["spec.kernel.artifact.url: needs a host (or bucket) and a path"],
    },
    Case {
        what: "In without values",
        patch: "{spec: {nodeSelector: {matchExpressions: [{key: gpu, operator: In}]}}}",
        expect: &[
            "spec.nodeSelector.matchExpressions[0].values: must not be empty for operator In",
        ],
    },
    Case {
        what: "zero analysis interval",
        patch: "{spec: {rollout: {analysis: {interval: 0s}}}}",
        expect: &["spec.rollout.analysis.interval: must be a positive duration"],
    },
];

const TRAINING_JOB_CASES: &[Case] = &[
    Case {
        what: "unknown pipeline mode",
        patch: "{spec: {pipeline: {mode: quadruple}}}",
        expect: &["spec.pipeline.mode", "Unsupported value"],
    },
    Case {
        what: "no placement",
        patch: "{spec: {placement: null}}",
        expect: &["spec.placement", "Required value"],
    },
    Case {
        what: "zero batch",
        patch: "{spec: {training: {batchSize: 0}}}",
        expect: &["spec.training.batchSize", "greater than or equal to 1"],
    },
    Case {
        what: "layer with two sources",
        patch: "{spec: {model: {layers: [{name: a, kernelDeploymentRef: k, conv2d: {inChannels: 3, outChannels: 3, kernelSize: [1, 1]}}]}}}",
        expect: &["spec.model.layers[0]: set exactly one of kernelDeploymentRef or conv2d"],
    },
    Case {
        what: "layer with no source",
        patch: "{spec: {model: {layers: [{name: a}]}}}",
        expect: &["spec.model.layers[0]: set exactly one of kernelDeploymentRef or conv2d"],
    },
    Case {
        what: "two data sources",
        patch: "{spec: {data: {artifact: {url: 's3://b/data', sha256: 0000000000000000000000000000000000000000000000000000000000000000}}}}",
        expect: &["spec.data: set exactly one of synthetic or artifact"],
    },
    Case {
        what: "channels not chaining",
        patch: "{spec: {model: {layers: [{name: a, conv2d: {inChannels: 3, outChannels: 8, kernelSize: [1, 1]}}, {name: b, conv2d: {inChannels: 4, outChannels: 3, kernelSize: [1, 1]}}]}}}",
        expect: &[
            "spec.model.layers[1].conv2d.inChannels: is 4 but 8 channels come into this layer; they must be equal",
        ],
    },
    Case {
        what: "batch over the data set",
        patch: "{spec: {training: {batchSize: 512}}}",
        expect: &["spec.training.batchSize: must not exceed the 256 samples"],
    },
    Case {
        what: "triple buffering without prefetch",
        patch: "{spec: {pipeline: {prefetchDepth: 1}}}",
        expect: &["spec.pipeline.prefetchDepth: must be at least 2 for triple buffering"],
    },
    Case {
        what: "momentum of 1",
        patch: "{spec: {training: {momentum: 1.0}}}",
        expect: &["spec.training.momentum: must be at least 0 and below 1"],
    },
    Case {
        what: "nothing to train",
        patch: "{spec: {model: {layers: [{name: a, kernelDeploymentRef: k}]}}}",
        expect: &["spec.model.layers: needs at least one inline conv2d layer"],
    },
    Case {
        what: "zero deadline",
        patch: "{spec: {runPolicy: {activeDeadlineSeconds: 0}}}",
        expect: &[
            "spec.runPolicy.activeDeadlineSeconds",
            "greater than or equal to 1",
        ],
    },
    Case {
        what: "checkpoint every zero steps",
        patch: "{spec: {checkpoint: {everySteps: 0}}}",
        expect: &["spec.checkpoint.everySteps", "greater than or equal to 1"],
    },
    Case {
        what: "duplicate layer names",
        patch: "{spec: {model: {layers: [{name: a, conv2d: {inChannels: 3, outChannels: 3, kernelSize: [1, 1]}}, {name: a, conv2d: {inChannels: 3, outChannels: 3, kernelSize: [1, 1]}}]}}}",
        expect: &["spec.model.layers[1].name: duplicate layer name"],
    },
];

fn dynamic_api(client: &kube::Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kernelflow.dev", "v1alpha1", kind);
    let plural = format!("{}s", kind.to_lowercase());
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, &plural),
    )
}

async fn rejected(
    api: &Api<DynamicObject>,
    base: &serde_json::Value,
    cases: &[Case],
) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut object = merged(base.clone(), yaml(case.patch));
        object["metadata"]["name"] = format!("bad-{i}").into();
        let object: DynamicObject = serde_json::from_value(object).expect("a well-formed object");
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(kube::Error::Api(s)) => {
                let missing: Vec<_> = case
                    .expect
                    .iter()
                    .filter(|e| !s.message.contains(*e))
                    .collect();
                if s.code != 400 && s.code != 422 || !missing.is_empty() {
                    failures.push(format!(
                        "{}: HTTP {} {:?}, missing {missing:?}",
                        case.what, s.code, s.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.what)),
        }
    }
    failures
}

#[tokio::test]
async fn malformed_resources_are_rejected_with_the_field_named() {
    let (_, client, ns) = setup("admission").await;
    let mut failures = rejected(
        &dynamic_api(&client, &ns, "KernelDeployment"),
        &kernel_deployment("x"),
        KERNEL_DEPLOYMENT_CASES,
    )
    .await;
    failures.extend(
        rejected(
            &dynamic_api(&client, &ns, "AsyncTrainingJob"),
            &training_job("x"),
            TRAINING_JOB_CASES,
        )
        .await,
    );
    assert!(
        failures.is_empty(),
        "{} cases went wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn a_training_job_may_change_only_its_run_policy() {
    let (_, client, ns) = setup("admission-update").await;
    let api = dynamic_api(&client, &ns, "AsyncTrainingJob");
    let job: DynamicObject = serde_json::from_value(training_job("job")).unwrap();
    api.create(&PostParams::default(), &job).await.unwrap();
    let patch = |p: &str| kube::api::Patch::Merge(yaml(p));
    let pp = kube::api::PatchParams::default();
    api.patch(
        "job",
        &pp,
        &patch("{spec: {runPolicy: {suspend: true, activeDeadlineSeconds: 60}}}"),
    )
    .await
    .expect("the run policy may change");
    let err = api
        .patch(
            "job",
            &pp,
            &patch("{spec: {training: {steps: 5}, placement: {replicas: 2}}}"),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(s) = err else {
        panic!("{err}")
    };
    assert!(
        s.message
            .contains("spec.training: cannot change once the job exists")
            && s.message.contains("spec.placement: cannot change")
            && s.message.contains("only spec.runPolicy may change"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn valid_resources_and_the_examples_are_accepted() {
    let (_, client, ns) = setup("admission-ok").await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut objects = vec![kernel_deployment("kd"), training_job("job")];
    for file in ["kerneldeployment.yaml", "asynctrainingjob.yaml"] {
        let text = std::fs::read_to_string(examples.join(file)).expect("the example exists");
        objects.push(yaml(&text));
    }
    for object in objects {
        let kind = object["kind"].as_str().expect("a kind").to_string();
        let object: DynamicObject = serde_json::from_value(object).expect("a well-formed object");
        let name = object.metadata.name.clone().unwrap_or_default();
        dynamic_api(&client, &ns, &kind)
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("{kind} {name} was rejected: {e}"));
    }
}
