//! The store against a real HTTP server on loopback that serves artifacts well, and badly:
//! failing, hanging, truncating, sending wrong bytes, and claiming gigabytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kernelflow_crds::ArtifactRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::format::tests::{artifact, conv};
use super::format::{ArtifactError, sha256_hex};
use super::metrics::CacheMetrics;
use super::remote::{BreakerState, Remote, RetryPolicy};
use super::store::{KernelStore, StoreConfig};

/// A loopback HTTP/1.1 server; the path picks the behaviour. Counts requests.
struct Server {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(good: Vec<u8>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let good = good.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                let ok = |len: usize| {
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
                };
                match path.as_str() {
                    "/ok" => {
                        let _ = sock.write_all(ok(good.len()).as_bytes()).await;
                        let _ = sock.write_all(&good).await;
                    }
                    "/slow" => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = sock.write_all(ok(good.len()).as_bytes()).await;
                        let _ = sock.write_all(&good).await;
                    }
                    "/fail" => {
                        let _ = sock.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    }
                    "/hang" => tokio::time::sleep(Duration::from_secs(3600)).await,
                    "/truncated" => {
                        let _ = sock.write_all(ok(good.len()).as_bytes()).await;
                        let _ = sock.write_all(&good[..good.len() / 2]).await;
                    }
                    "/wrong" => {
                        let mut bad = good.clone();
                        let last = bad.len() - 1;
                        bad[last] ^= 0xff;
                        let _ = sock.write_all(ok(bad.len()).as_bytes()).await;
                        let _ = sock.write_all(&bad).await;
                    }
                    "/gigabytes" => {
                        let _ = sock.write_all(ok(5 << 30).as_bytes()).await;
                        let _ = sock.write_all(&good).await;
                    }
                    _ => {
                        let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    }
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Server {
        addr,
        requests,
        task,
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        backoff: Duration::from_millis(10),
        attempt_timeout: Duration::from_millis(500),
        breaker_threshold: 5,
        breaker_cooldown: Duration::from_secs(60),
    }
}

fn store(disk: Option<std::path::PathBuf>) -> Arc<KernelStore> {
    KernelStore::new(
        StoreConfig {
            disk_dir: disk,
            retry: policy(),
            ..StoreConfig::default()
        },
        CacheMetrics::default(),
    )
    .unwrap()
}

fn reference(server: &Server, path: &str, sha256: &str) -> ArtifactRef {
    ArtifactRef {
        url: format!("http://{}{path}", server.addr),
        sha256: sha256.into(),
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kf-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test]
async fn fetches_once_then_serves_from_memory_and_disk() {
    let (bytes, digest) = artifact(1);
    let server = serve(bytes).await;
    let dir = temp_dir("tiers");
    let s = store(Some(dir.clone()));
    let a = reference(&server, "/slow", &digest);
    // Ten concurrent requests share one fetch.
    let c = conv();
    let all = futures::future::join_all((0..10).map(|_| s.get(&a, &c))).await;
    assert!(all.iter().all(Result::is_ok));
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    s.get(&a, &conv()).await.unwrap();
    assert_eq!(s.metrics.hits.with_label_values(&["memory"]).get(), 1);
    // The digest, not the URL, names a kernel: a broken URL pinned to a warm digest is served.
    s.get(&reference(&server, "/missing", &digest), &c)
        .await
        .unwrap();
    assert_eq!(s.metrics.hits.with_label_values(&["memory"]).get(), 2);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);

    // A restarted agent (a new store on the same disk) is warm without the server.
    drop(server);
    let restarted = store(Some(dir));
    let k = restarted.get(&a, &conv()).await.unwrap();
    assert_eq!(k.sha256, digest);
    assert_eq!(restarted.metrics.hits.with_label_values(&["disk"]).get(), 1);
}

#[tokio::test]
async fn bad_answers_are_typed_refusals() {
    let (bytes, digest) = artifact(2);
    let server = serve(bytes).await;
    let s = store(None);
    let cases = [
        ("/wrong", "DigestMismatch"),
        ("/truncated", "FetchFailed"),
        ("/gigabytes", "TooLarge"),
        ("/hang", "FetchFailed"),
        ("/missing", "NotFound"),
    ];
    for (path, reason) in cases {
        let err = s
            .get(&reference(&server, path, &digest), &conv())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), reason, "{path}: {err}");
    }
    assert_eq!(
        s.metrics
            .validation_failures
            .with_label_values(&["DigestMismatch"])
            .get(),
        1
    );
    // A refusal that ten requests shared counts once, as the one load it was.
    let wrong = reference(&server, "/wrong", &digest);
    let c = conv();
    let all = futures::future::join_all((0..10).map(|_| s.get(&wrong, &c))).await;
    assert!(all.iter().all(Result::is_err));
    assert_eq!(
        s.metrics
            .validation_failures
            .with_label_values(&["DigestMismatch"])
            .get(),
        2
    );
}

/// Local files: a regular one beneath the file root is read, through relative links that
/// stay beneath it; a FIFO, which would block the thread opening it for good, is not found, as a
/// missing file or a link out is; a name out of the root is forbidden.
#[tokio::test]
async fn file_urls_read_only_regular_files_under_the_file_root() {
    let (bytes, _) = artifact(3);
    let dir = temp_dir("local");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("k.safetensors"), &bytes).unwrap();
    std::fs::write(dir.join("outside"), &bytes).unwrap();
    let link = |target: std::path::PathBuf, name: &str| {
        std::os::unix::fs::symlink(target, root.join(name)).unwrap();
    };
    link(dir.join("outside"), "link-out");
    link(dir.join("gone"), "link-gone");
    link(dir.clone(), "dir-out");
    // Relative: an absolute link leads out of the root's view, wherever it points.
    link("k.safetensors".into(), "link-in");
    let made = std::process::Command::new("mkfifo")
        .arg(root.join("fifo"))
        .status();
    assert!(made.unwrap().success());
    let remote = |file_root| Remote::new(policy(), file_root, CacheMetrics::default());
    let r = remote(Some(root.clone()));
    let url = |name: &str| format!("file://{}", root.join(name).display());
    for name in ["k.safetensors", "link-in"] {
        assert_eq!(r.fetch(&url(name), 1 << 20).await.unwrap(), bytes, "{name}");
    }
    let big = r.fetch(&url("k.safetensors"), 16).await.unwrap_err();
    assert_eq!(big.reason(), "TooLarge", "{big}");
    let reason = |url: String| {
        let r = &r;
        async move {
            let refused = tokio::time::timeout(Duration::from_secs(10), r.fetch(&url, 1 << 20));
            let err = refused.await.expect("no answer").unwrap_err();
            (err.reason(), err.to_string())
        }
    };
    // Below the root, whatever is missing or leads out is not found alike: whether the
    // target of a link out exists, or a file beyond it, cannot be told.
    for name in [
        "fifo",
        "missing",
        "link-out",
        "link-gone",
        "dir-out/outside",
        "dir-out/gone",
    ] {
        assert_eq!(reason(url(name)).await.0, "NotFound", "{name}");
    }
    // Named out of the root, whether the file exists or not: refused before anything is
    // looked up.
    let outside = format!("file://{}", dir.join("outside").display());
    let (why, message) = reason(outside).await;
    assert_eq!(why, "Forbidden");
    assert!(message.contains("--file-root"), "{message}");
    for url in [
        url("../outside"),
        "file:///etc/hostname".into(),
        "file:///no/such/file".into(),
    ] {
        assert_eq!(reason(url.clone()).await.0, "Forbidden", "{url}");
    }
    // Without a root, every file:// URL is refused.
    let err = remote(None)
        .fetch(&url("k.safetensors"), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "Forbidden", "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_header_claiming_gigabytes_is_refused_cheaply() {
    let (mut bytes, _) = artifact(3);
    bytes[..8].copy_from_slice(&(4u64 << 30).to_le_bytes());
    let digest = sha256_hex(&bytes);
    let server = serve(bytes).await;
    let err = store(None)
        .get(&reference(&server, "/ok", &digest), &conv())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::HeaderTooLarge { claimed, .. } if claimed == 4 << 30),
        "{err}"
    );
}

#[tokio::test]
async fn the_breaker_opens_and_cached_kernels_keep_serving() {
    let (bytes, digest) = artifact(4);
    let server = serve(bytes).await;
    let s = store(None);
    let good = reference(&server, "/ok", &digest);
    s.get(&good, &conv()).await.unwrap();
    let failing = reference(&server, "/fail", &"1".repeat(64));
    // Two attempts per get: the fifth consecutive failure opens the breaker.
    for _ in 0..2 {
        assert_eq!(
            s.get(&failing, &conv()).await.unwrap_err().reason(),
            "FetchFailed"
        );
    }
    let before = server.requests.load(Ordering::SeqCst);
    let err = s.get(&failing, &conv()).await.unwrap_err();
    assert_eq!(s.remote().breaker(&failing.url), Some(BreakerState::Open));
    assert_eq!(err.reason(), "StoreUnavailable", "{err}");
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        before + 1,
        "an open breaker sends nothing more"
    );
    assert_eq!(
        s.metrics
            .breaker_open
            .with_label_values(&[&format!("http://{}", server.addr)])
            .get(),
        1
    );
    // The cached kernel still serves.
    assert!(s.get(&good, &conv()).await.is_ok());
}

#[tokio::test]
async fn a_dropped_probe_does_not_keep_the_breaker_half_open() {
    let server = serve(Vec::new()).await;
    let url = |path: &str| format!("http://{}{path}", server.addr);
    let once = RetryPolicy {
        attempts: 1,
        breaker_threshold: 1,
        breaker_cooldown: Duration::ZERO,
        ..policy()
    };
    let remote = Remote::new(once, None, CacheMetrics::default());
    remote.fetch(&url("/fail"), 1024).await.unwrap_err();
    assert_eq!(remote.breaker(&url("/ok")), Some(BreakerState::Open));
    // The probe hangs, and its caller gives up on it.
    let hang = url("/hang");
    tokio::time::timeout(Duration::from_millis(100), remote.fetch(&hang, 1024))
        .await
        .unwrap_err();
    assert_eq!(remote.breaker(&url("/ok")), Some(BreakerState::Open));
    remote.fetch(&url("/ok"), 1024).await.unwrap();
    assert_eq!(remote.breaker(&url("/ok")), Some(BreakerState::Closed));
}
