//! `umdev-k8s`: the device plugin's binary (a DaemonSet or a systemd unit beside umdevd).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use umdev_k8s::checkpoint::Checkpoint;
use umdev_k8s::kubelet::Kubelet;
use umdev_k8s::plugin::{Options, Shared};
use umdev_k8s::tree::Tree;

/// Offers umdev's mediated devices to the kubelet: one extended resource per mdev type.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// umdevd's root (its sysfs tree is `<root>/sys`).
    #[arg(long, default_value = "/run/umdev")]
    root: PathBuf,
    /// umdevd's control socket (default `<root>/state/control.sock`).
    #[arg(long)]
    control: Option<PathBuf>,
    /// The kubelet's device-plugin directory.
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    kubelet_dir: PathBuf,
    /// The kubelet's pod-resources socket.
    #[arg(long, default_value = "/var/lib/kubelet/pod-resources/kubelet.sock")]
    pod_resources: PathBuf,
    /// Resource name prefix: resources are `<prefix>/<type-id>`.
    #[arg(long, default_value = "umdev.io")]
    prefix: String,
    /// Where the plugin keeps what it handed out.
    #[arg(long, default_value = "/var/lib/umdev-k8s")]
    state_dir: PathBuf,
    /// Where a device's directory appears in the container (`<dir>/<n>`).
    #[arg(long, default_value = "/var/run/umdev")]
    container_dir: PathBuf,
    /// `user[:group]` that gets each allocated device's socket (the pods' VMM).
    #[arg(long)]
    owner: Option<String>,
    /// Also answer with CDI device names `<kind>=<uuid>`.
    #[arg(long)]
    cdi_kind: Option<String>,
    /// Seconds an instance no pod holds is kept before it is removed.
    #[arg(long, default_value_t = 60)]
    grace_secs: u64,
    /// Offer a type in bundles: `<type-id>=<n>` makes each slot `n` devices of one parent
    /// sharing an IOMMU group (the type's parent must share peer-to-peer resources).
    #[arg(long, value_name = "TYPE=N", value_parser = parse_bundle)]
    bundle: Vec<(String, u32)>,
    /// How often sockets and pods are looked at, in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
}

/// `<type-id>=<n>`, `n` at least 2.
fn parse_bundle(s: &str) -> Result<(String, u32), String> {
    let (t, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected <type-id>=<n>"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a number of devices"))?;
    if t.is_empty() || n < 2 {
        return Err(format!(
            "{s:?}: a bundle is a type id and at least 2 devices"
        ));
    }
    Ok((t.to_owned(), n))
}

fn main() -> Result<()> {
    let filter = std::env::var("UMDEV_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let checkpoint = Checkpoint::load(&a.state_dir.join("checkpoint.json"))?;
    let options = Options {
        prefix: a.prefix,
        container_dir: a.container_dir,
        owner: a.owner,
        control: a
            .control
            .unwrap_or_else(|| a.root.join("state/control.sock")),
        cdi_kind: a.cdi_kind,
        socket_timeout: Duration::from_secs(10),
        bundles: a.bundle.into_iter().collect(),
    };
    let shared = Shared::new(Tree::new(&a.root), checkpoint, options);
    let kubelet = Kubelet {
        dir: a.kubelet_dir,
        pod_resources: a.pod_resources,
        grace: Duration::from_secs(a.grace_secs),
        interval: Duration::from_millis(a.interval_ms.max(10)),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        println!("ready");
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        kubelet.run(shared, stop).await;
    });
    Ok(())
}
