//! The committed generated files (CRD YAML in `crds/` and in the chart, the CRD reference)
//! must be what `crdgen` writes from the types today.

use std::path::{Path, PathBuf};

#[test]
fn generated_files_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("kernelflow-crdgen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_crdgen"))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running crdgen");
    assert!(status.success(), "crdgen failed");
    let generated = files(&out);
    assert!(
        generated.len() >= 7,
        "crdgen wrote only {generated:?}: three CRDs twice and the reference"
    );
    let stale: Vec<String> = generated
        .iter()
        .filter(|rel| {
            let fresh = std::fs::read_to_string(out.join(rel)).expect("reading crdgen's output");
            std::fs::read_to_string(root.join(rel)).ok() != Some(fresh)
        })
        .map(|rel| rel.display().to_string())
        .collect();
    std::fs::remove_dir_all(&out).expect("removing crdgen's output");
    assert!(
        stale.is_empty(),
        "{} out of date with the Rust types; regenerate with:\n\n    cargo run -p kernelflow-crds --bin crdgen\n",
        stale.join(", ")
    );
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)
            .expect("reading crdgen's output")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    out
}
