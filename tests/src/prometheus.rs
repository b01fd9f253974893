//! Debian's real Prometheus on loopback, for end-to-end tests of the alerts: it scrapes the
//! given targets every second and evaluates the given rules every second.
//!
//! ```no_run
//! # async fn f(agent: std::net::SocketAddr) -> anyhow::Result<()> {
//! use kernelflow_e2e::prometheus::{Prometheus, Target, RULES};
//! let prom = Prometheus::start(RULES, &[Target::new(agent).label("node", "gpu-a")]).await?;
//! let alert = prom.wait_for_alert("KernelflowArtifactStoreBreakerOpen", std::time::Duration::from_secs(90)).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cluster::{free_port, supervised, tail, tool};
use crate::env::http_get;

/// The alerts of the chart (a plain rules file), relative to the workspace root.
pub const RULES: &str = "charts/kernelflow/files/prometheus-rules.yaml";

/// A scrape target and the labels its series get (e.g. the agent's `node`).
#[derive(Clone, Debug)]
pub struct Target {
    pub address: SocketAddr,
    pub labels: BTreeMap<String, String>,
}

impl Target {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            labels: BTreeMap::new(),
        }
    }

    pub fn label(mut self, name: &str, value: &str) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }
}

/// An alert as `/api/v1/alerts` shows it.
#[derive(Clone, Debug)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
}

/// A running Prometheus; killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus with the rules file `rules` (relative to the workspace root, or
    /// absolute) scraping `targets`, and waits until it is ready. The process gets SIGKILL
    /// when the calling thread ends.
    pub async fn start(rules: &str, targets: &[Target]) -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let rules = root.join(rules);
        let dir = std::env::temp_dir().join(format!(
            "kernelflow-{}-prometheus-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let static_configs: Vec<Value> = targets
            .iter()
            .map(|t| serde_json::json!({"targets": [t.address.to_string()], "labels": t.labels}))
            .collect();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rules],
            "scrape_configs": [{"job_name": "kernelflow", "static_configs": static_configs}],
        });
        // JSON is YAML.
        std::fs::write(dir.join("prometheus.yml"), config.to_string())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = dir.join("prometheus.log");
        let mut child = supervised(&tool("prometheus")?, &log)?
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .spawn()
            .context("starting prometheus")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(addr, "/-/ready").await.map(|(code, _)| code) != Some(200) {
            if let Some(status) = child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", tail(&log));
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30s:\n{}", tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { child, dir, addr })
    }

    /// The `data` of an API GET, failing on an error status.
    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (code, body) = http_get(self.addr, path)
            .await
            .context("prometheus is not answering")?;
        let json: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {code}: {body}"))?;
        if json["status"] != "success" {
            bail!("prometheus answered {code}: {body}");
        }
        Ok(json["data"].clone())
    }

    /// Evaluates an instant PromQL query: each series' labels and value.
    pub async fn query(
        &self,
        promql: &str,
    ) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .await?;
        let series = data["result"].as_array().context("a vector result")?;
        series
            .iter()
            .map(|s| {
                let labels = serde_json::from_value(s["metric"].clone())?;
                let value = s["value"][1].as_str().context("a sample value")?.parse()?;
                Ok((labels, value))
            })
            .collect()
    }

    /// Every pending or firing alert.
    pub async fn alerts(&self) -> anyhow::Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts").await?;
        let alerts = data["alerts"].as_array().context("a list of alerts")?;
        alerts
            .iter()
            .map(|a| {
                Ok(Alert {
                    labels: serde_json::from_value(a["labels"].clone())?,
                    annotations: serde_json::from_value(a["annotations"].clone())?,
                    state: a["state"].as_str().unwrap_or_default().to_string(),
                })
            })
            .collect()
    }

    /// Waits until the alert `name` fires; the error lists the alerts there are instead.
    pub async fn wait_for_alert(&self, name: &str, timeout: Duration) -> anyhow::Result<Alert> {
        let deadline = Instant::now() + timeout;
        loop {
            let alerts = self.alerts().await?;
            if let Some(alert) = alerts.iter().find(|a| {
                a.labels.get("alertname").is_some_and(|n| n == name) && a.state == "firing"
            }) {
                return Ok(alert.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not fire in {timeout:?}; alerts: {alerts:?}\n{}",
                    tail(&self.dir.join("prometheus.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
