//! The committed CRD YAML must be what the types generate.

#[test]
fn crd_yaml_is_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, crd) in kernelflow_crds::crds() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            committed == kernelflow_crds::crd_yaml(&crd),
            "crds/{file} is out of date with the Rust types; regenerate it with:\n\n    cargo run -p kernelflow-crds --bin crdgen\n"
        );
    }
}
