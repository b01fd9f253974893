//! Kernel cache benchmarks: `cargo bench -p kernelflow-agent --bench cache`.
//! L1 hit latency, L2 hit (load from disk) and a cold fetch from a loopback HTTP store, for a
//! 10 MB artifact. Prints markdown for docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kernelflow_agent::artifact::format::{pack, sha256_hex};
use kernelflow_agent::artifact::metrics::CacheMetrics;
use kernelflow_agent::artifact::store::{KernelStore, StoreConfig};
use kernelflow_agent::compute::ops::uniform;
use kernelflow_crds::{ArtifactRef, Conv2dSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Serves `body` at every path over HTTP/1.1 on loopback.
async fn serve(body: Arc<Vec<u8>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    addr
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 512 -> 512 channels, 3x3: 2.36M parameters, 9.4 MB.
    let conv = Conv2dSpec {
        padding: [1, 1],
        ..Conv2dSpec::new(512, 512, [3, 3])
    };
    let bytes = pack(
        &conv,
        &uniform(512 * 512 * 9, 1, 0.05),
        Some(&uniform(512, 2, 0.05)),
        None,
    )
    .unwrap();
    let sha256 = sha256_hex(&bytes);
    let dir = std::env::temp_dir().join(format!("kf-cache-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let body = Arc::new(bytes.clone());
    let addr = rt.block_on(serve(body));
    let artifact = ArtifactRef {
        url: format!("http://{addr}/conv512.safetensors"),
        sha256,
    };
    let store = |disk: bool| {
        KernelStore::new(
            StoreConfig {
                disk_dir: disk.then(|| dir.clone()),
                ..StoreConfig::default()
            },
            CacheMetrics::default(),
        )
        .unwrap()
    };

    println!(
        "# kernel cache ({} MB artifact, {} cores)\n",
        bytes.len() / 1_000_000,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| path | p50 | p99 | runs |\n|---|---|---|---|");

    let mut cold = Vec::new();
    for _ in 0..10 {
        let s = store(false);
        let t = Instant::now();
        rt.block_on(s.get(&artifact, &conv)).unwrap();
        cold.push(t.elapsed());
    }
    cold.sort();
    println!(
        "| cold fetch from a loopback HTTP store (fetch, sha256, validate) | {:.2?} | {:.2?} | {} |",
        percentile(&cold, 0.5),
        percentile(&cold, 0.99),
        cold.len()
    );

    rt.block_on(store(true).get(&artifact, &conv)).unwrap();
    let mut disk = Vec::new();
    for _ in 0..10 {
        let s = store(true);
        let t = Instant::now();
        rt.block_on(s.get(&artifact, &conv)).unwrap();
        disk.push(t.elapsed());
    }
    disk.sort();
    println!(
        "| L2 hit: load from disk (read, sha256, validate) | {:.2?} | {:.2?} | {} |",
        percentile(&disk, 0.5),
        percentile(&disk, 0.99),
        disk.len()
    );

    let warm = store(false);
    rt.block_on(warm.get(&artifact, &conv)).unwrap();
    let mut memory = Vec::with_capacity(100_000);
    rt.block_on(async {
        for _ in 0..100_000 {
            let t = Instant::now();
            std::hint::black_box(warm.get(&artifact, &conv).await.unwrap());
            memory.push(t.elapsed());
        }
    });
    memory.sort();
    println!(
        "| L1 hit (memory) | {:.2?} | {:.2?} | {} |",
        percentile(&memory, 0.5),
        percentile(&memory, 0.99),
        memory.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
