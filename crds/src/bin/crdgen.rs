//! Writes the CRD YAML under `crds/` (or the directory given as the first argument).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (file, crd) in kernelflow_crds::crds() {
        let path = dir.join(file);
        std::fs::write(&path, kernelflow_crds::crd_yaml(&crd))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
