//! The kubelet side: one plugin server per type on a socket in the kubelet's device-plugin
//! directory, registered with its `Registration` service, served again and re-registered
//! when the kubelet restarts (it re-creates `kubelet.sock` and removes the plugins'
//! sockets); and the clean-up of instances no pod holds any more, from the kubelet's
//! pod-resources API, after a grace period.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::api::podresources::pod_resources_lister_client::PodResourcesListerClient;
use crate::api::podresources::ListPodResourcesRequest;
use crate::api::v1beta1::device_plugin_server::DevicePluginServer;
use crate::api::v1beta1::registration_client::RegistrationClient;
use crate::api::v1beta1::{DevicePluginOptions, RegisterRequest};
use crate::api::{KUBELET_SOCKET, VERSION};
use crate::plugin::{Shared, TypePlugin};

/// A gRPC channel over the UNIX socket `path`.
pub async fn uds_channel(path: &Path) -> Result<Channel> {
    let path = path.to_owned();
    // The URI is a placeholder: the connector dials the socket.
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await?;
    Ok(ch)
}

/// Where the plugin looks and what it does.
#[derive(Clone, Debug)]
pub struct Kubelet {
    /// The kubelet's device-plugin directory (`/var/lib/kubelet/device-plugins`).
    pub dir: PathBuf,
    /// The pod-resources socket (`/var/lib/kubelet/pod-resources/kubelet.sock`).
    pub pod_resources: PathBuf,
    /// How long an instance no pod holds is kept.
    pub grace: Duration,
    /// How often the sockets and the pods are looked at.
    pub interval: Duration,
}

/// A plugin being served.
struct Served {
    socket: PathBuf,
    ino: u64,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn ino(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.ino())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Served {
    /// Stops serving: a graceful shutdown waits for open calls, and a `ListAndWatch` stays
    /// open as long as the kubelet that called it, so after a moment the server is dropped.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_millis(500), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Kubelet {
    fn endpoint(type_id: &str) -> String {
        format!("umdev-{type_id}.sock")
    }

    async fn serve(&self, shared: &Arc<Shared>, type_id: &str) -> Result<Served> {
        let socket = self.dir.join(Self::endpoint(type_id));
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let ino = ino(&socket).unwrap_or(0);
        let plugin = TypePlugin {
            type_id: type_id.to_owned(),
            shared: shared.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let r = Server::builder()
                .add_service(DevicePluginServer::new(plugin))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "umdev-k8s: a plugin server ended");
            }
        });
        Ok(Served {
            socket,
            ino,
            shutdown: stop,
            task,
        })
    }

    async fn register(&self, shared: &Shared, type_id: &str) -> Result<()> {
        let ch = uds_channel(&self.dir.join(KUBELET_SOCKET)).await?;
        RegistrationClient::new(ch)
            .register(RegisterRequest {
                version: VERSION.into(),
                endpoint: Self::endpoint(type_id),
                resource_name: shared.resource(type_id),
                options: Some(DevicePluginOptions {
                    pre_start_required: false,
                    get_preferred_allocation_available: false,
                }),
            })
            .await?;
        tracing::info!(
            resource = shared.resource(type_id),
            "umdev-k8s: registered with the kubelet"
        );
        Ok(())
    }

    /// Serves every type's plugin until `stop` resolves: registers them, serves and
    /// registers again when the kubelet restarts or a plugin's socket goes, adds types
    /// that appear, and cleans up unheld instances.
    pub async fn run(&self, shared: Arc<Shared>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut served: BTreeMap<String, Served> = BTreeMap::new();
        let mut kubelet_ino: Option<u64> = None;
        let mut last_cleanup = std::time::Instant::now();
        let mut warned = false;
        loop {
            let k = ino(&self.dir.join(KUBELET_SOCKET));
            let restarted = k.is_some() && k != kubelet_ino;
            let mut types: BTreeSet<String> =
                shared.tree.types().into_iter().map(|t| t.type_id).collect();
            types.extend(
                shared
                    .checkpoint()
                    .slots
                    .values()
                    .map(|a| a.type_id.clone()),
            );
            for t in &types {
                let gone = served
                    .get(t)
                    .is_none_or(|s| ino(&s.socket) != Some(s.ino) || s.task.is_finished());
                if gone || restarted {
                    // The old server winds down in the background: its socket's path is
                    // already the new server's, and its callers (a kubelet that went) wait
                    // on nothing of ours.
                    if let Some(old) = served.remove(t) {
                        tokio::spawn(old.stop());
                    }
                    match self.serve(&shared, t).await {
                        Ok(s) => {
                            served.insert(t.clone(), s);
                        }
                        Err(e) => {
                            tracing::warn!(type_id = t.as_str(), error = %format!("{e:#}"), "umdev-k8s: cannot serve a plugin");
                            continue;
                        }
                    }
                    if k.is_some() {
                        if let Err(e) = self.register(&shared, t).await {
                            tracing::warn!(type_id = t.as_str(), error = %format!("{e:#}"), "umdev-k8s: registration failed; trying again");
                            if let Some(s) = served.remove(t) {
                                tokio::spawn(s.stop());
                            }
                            continue;
                        }
                    }
                }
            }
            if k.is_some() && served.len() == types.len() {
                kubelet_ino = k;
            }
            if last_cleanup.elapsed() >= self.interval.max(Duration::from_millis(500)) {
                last_cleanup = std::time::Instant::now();
                match self.cleanup(&shared).await {
                    Ok(()) => warned = false,
                    Err(e) if !warned => {
                        warned = true;
                        tracing::info!(error = %format!("{e:#}"), "umdev-k8s: no pod resources to clean up by (will retry)");
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
        let mut stopping = Vec::new();
        for (_, s) in served {
            let _ = std::fs::remove_file(&s.socket);
            stopping.push(tokio::spawn(s.stop()));
        }
        for s in stopping {
            let _ = s.await;
        }
    }

    /// Instances whose slot no pod holds (per the kubelet's pod-resources List) for longer
    /// than the grace period are removed.
    async fn cleanup(&self, shared: &Arc<Shared>) -> Result<()> {
        if shared.checkpoint().slots.is_empty() {
            return Ok(());
        }
        let ch = uds_channel(&self.pod_resources).await?;
        let pods = PodResourcesListerClient::new(ch)
            .list(ListPodResourcesRequest {})
            .await?
            .into_inner();
        let held: BTreeSet<(String, String)> = pods
            .pod_resources
            .iter()
            .flat_map(|p| &p.containers)
            .flat_map(|c| &c.devices)
            .flat_map(|d| {
                d.device_ids
                    .iter()
                    .map(|id| (d.resource_name.clone(), id.clone()))
            })
            .collect();
        let mut expired = Vec::new();
        {
            let mut c = shared.checkpoint();
            let mut dirty = false;
            for (id, a) in &mut c.slots {
                let is_held = held.contains(&(shared.resource(&a.type_id), id.clone()));
                match (is_held, a.unheld_since_ms) {
                    (true, Some(_)) => {
                        a.unheld_since_ms = None;
                        dirty = true;
                    }
                    (false, None) => {
                        a.unheld_since_ms = Some(now_ms());
                        dirty = true;
                    }
                    (false, Some(t))
                        if u128::from(now_ms().saturating_sub(t)) >= self.grace.as_millis() =>
                    {
                        expired.push(id.clone());
                    }
                    _ => {}
                }
            }
            if dirty {
                c.save()?;
            }
        }
        for id in expired {
            let s = shared.clone();
            let slot = id.clone();
            tokio::task::spawn_blocking(move || s.release_slot(&slot)).await??;
            tracing::info!(
                slot = id,
                "umdev-k8s: no pod holds it any more: instance removed"
            );
            shared.notify();
        }
        Ok(())
    }
}
