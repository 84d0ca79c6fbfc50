//! A stub kubelet for the device plugin's tests: the `Registration` service on
//! `<dir>/kubelet.sock` checking what the kubelet checks, the pod-resources `List` on a socket
//! of its own answering what the test says the pods hold, and a client of a registered
//! plugin (`GetDevicePluginOptions`, `ListAndWatch`, `Allocate`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use umdev_k8s::api::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use umdev_k8s::api::podresources::{
    ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse,
    PodResources,
};
use umdev_k8s::api::v1beta1::device_plugin_client::DevicePluginClient;
use umdev_k8s::api::v1beta1::registration_server::{Registration, RegistrationServer};
use umdev_k8s::api::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest, DevicePluginOptions, Empty,
    ListAndWatchResponse, RegisterRequest,
};
use umdev_k8s::kubelet::uds_channel;

/// A registration the stub accepted, and when.
#[derive(Clone, Debug)]
pub struct Registered {
    /// What the plugin sent.
    pub req: RegisterRequest,
    /// When.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    registered: Vec<Registered>,
    refused: Vec<String>,
    /// (resource, device IDs) the pods hold.
    held: Vec<(String, Vec<String>)>,
}

#[derive(Clone)]
struct Reg {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
}

/// Whether `name` is a valid extended resource name, as the kubelet checks it: a DNS
/// subdomain prefix (not `kubernetes.io`) and a name of letters, digits, `-`, `_`, `.`.
fn valid_resource(name: &str) -> bool {
    let Some((prefix, rest)) = name.split_once('/') else {
        return false;
    };
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let name_ok = !rest.is_empty()
        && rest.len() <= 63
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && rest.as_bytes()[0].is_ascii_alphanumeric()
        && rest.as_bytes()[rest.len() - 1].is_ascii_alphanumeric();
    prefix.split('.').all(label) && !prefix.ends_with("kubernetes.io") && name_ok
}

#[tonic::async_trait]
impl Registration for Reg {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        let why = if r.version != "v1beta1" {
            Some(format!("unsupported version {:?}", r.version))
        } else if r.endpoint.is_empty() || r.endpoint.contains('/') {
            Some(format!("endpoint {:?} is not a file name", r.endpoint))
        } else if !valid_resource(&r.resource_name) {
            Some(format!("invalid resource name {:?}", r.resource_name))
        } else if !crate::guest::is_socket(&self.dir.join(&r.endpoint)) {
            Some(format!("nothing listens at {}", r.endpoint))
        } else {
            None
        };
        let mut st = self.state.lock().unwrap();
        if let Some(why) = why {
            st.refused.push(why.clone());
            return Err(Status::invalid_argument(why));
        }
        // The kubelet dials back before it answers.
        drop(st);
        let ch = uds_channel(&self.dir.join(&r.endpoint))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        DevicePluginClient::new(ch)
            .get_device_plugin_options(Empty {})
            .await?;
        self.state.lock().unwrap().registered.push(Registered {
            req: r,
            at: Instant::now(),
        });
        Ok(Response::new(Empty {}))
    }
}

#[derive(Clone)]
struct Pods(Arc<Mutex<State>>);

#[tonic::async_trait]
impl PodResourcesLister for Pods {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let held = self.0.lock().unwrap().held.clone();
        let containers = held
            .into_iter()
            .map(|(resource, ids)| ContainerResources {
                name: "vmm".into(),
                devices: vec![ContainerDevices {
                    resource_name: resource,
                    device_ids: ids,
                }],
                cpu_ids: Vec::new(),
            })
            .collect();
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "vm-pod".into(),
                namespace: "default".into(),
                containers,
            }],
        }))
    }
}

/// Serves `router` on `listener` until `stop` turns true.
fn spawn_until(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let _ = router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    let _ = stop.wait_for(|v| *v).await;
                },
            )
            .await;
    });
}

/// The stub: its runtime, its sockets and what it saw.
pub struct Kubelet {
    /// The device-plugin directory.
    pub dir: PathBuf,
    /// The pod-resources socket.
    pub pod_resources: PathBuf,
    /// The runtime the stub and the test's calls run on.
    pub rt: tokio::runtime::Runtime,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Kubelet {
    /// Starts the stub in `dir` (the device-plugin directory) with the pod-resources
    /// socket beside it.
    pub fn start(dir: &Path) -> Kubelet {
        std::fs::create_dir_all(dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut k = Kubelet {
            dir: dir.to_owned(),
            pod_resources: dir.join("pod-resources.sock"),
            rt,
            state: Arc::default(),
            stop: None,
        };
        k.serve();
        k
    }

    /// (Re)creates the kubelet's sockets, as a kubelet (re)starting does.
    pub fn serve(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
            std::thread::sleep(Duration::from_millis(50));
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.stop = Some(tx);
        let sock = self.dir.join("kubelet.sock");
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&self.pod_resources);
        let reg = Reg {
            dir: self.dir.clone(),
            state: self.state.clone(),
        };
        let pods = Pods(self.state.clone());
        let pod_sock = self.pod_resources.clone();
        self.rt.block_on(async {
            let l = UnixListener::bind(&sock).unwrap();
            spawn_until(
                Server::builder().add_service(RegistrationServer::new(reg)),
                l,
                rx.clone(),
            );
            let l = UnixListener::bind(&pod_sock).unwrap();
            spawn_until(
                Server::builder().add_service(PodResourcesListerServer::new(pods)),
                l,
                rx,
            );
        });
    }

    /// A kubelet restart: every plugin socket in the directory removed, the kubelet's own
    /// sockets made again.
    pub fn restart(&mut self) {
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("umdev-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.serve();
    }

    /// The registrations accepted so far.
    pub fn registered(&self) -> Vec<Registered> {
        self.state.lock().unwrap().registered.clone()
    }

    /// The registrations refused, with why.
    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }

    /// Waits until `resource` has registered more than `after` times; when it did.
    pub fn wait_registered(
        &self,
        resource: &str,
        after: usize,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let r: Vec<Registered> = self
                .registered()
                .into_iter()
                .filter(|r| r.req.resource_name == resource)
                .collect();
            if r.len() > after {
                return r.last().map(|r| r.at);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the pods hold: (resource, device IDs).
    pub fn set_held(&self, held: Vec<(String, Vec<String>)>) {
        self.state.lock().unwrap().held = held;
    }

    /// A client of the plugin registered for `resource`.
    pub fn plugin(&self, resource: &str) -> DevicePluginClient<tonic::transport::Channel> {
        let endpoint = self
            .registered()
            .into_iter()
            .rev()
            .find(|r| r.req.resource_name == resource)
            .unwrap_or_else(|| panic!("{resource} never registered"))
            .req
            .endpoint;
        let path = self.dir.join(endpoint);
        let ch = self.rt.block_on(uds_channel(&path)).unwrap();
        DevicePluginClient::new(ch)
    }

    /// GetDevicePluginOptions of `resource`'s plugin.
    pub fn options(&self, resource: &str) -> DevicePluginOptions {
        let mut c = self.plugin(resource);
        self.rt
            .block_on(c.get_device_plugin_options(Empty {}))
            .unwrap()
            .into_inner()
    }

    /// A ListAndWatch stream of `resource`'s plugin.
    pub fn watch(&self, resource: &str) -> tonic::Streaming<ListAndWatchResponse> {
        let mut c = self.plugin(resource);
        self.rt
            .block_on(c.list_and_watch(Empty {}))
            .unwrap()
            .into_inner()
    }

    /// The next list on `stream` within `timeout`.
    pub fn next(
        &self,
        stream: &mut tonic::Streaming<ListAndWatchResponse>,
        timeout: Duration,
    ) -> Option<ListAndWatchResponse> {
        self.rt.block_on(async {
            tokio::time::timeout(timeout, stream.message())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        })
    }

    /// Allocate of `resource`: one container asking for `ids`.
    #[allow(clippy::result_large_err)] // tonic's own error type, as its calls return it
    pub fn allocate(&self, resource: &str, ids: &[&str]) -> Result<AllocateResponse, Status> {
        let mut c = self.plugin(resource);
        self.rt
            .block_on(c.allocate(AllocateRequest {
                container_requests: vec![ContainerAllocateRequest {
                    devices_i_ds: ids.iter().map(|s| (*s).to_owned()).collect(),
                }],
            }))
            .map(Response::into_inner)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
    }
}

/// The plugin binary (`umdev-k8s`) run against umdevd's tree at `root` and the stub
/// `kubelet`, keeping what it hands out in `state`; stopped by SIGTERM when dropped.
pub struct Plugin {
    child: std::process::Child,
}

impl Plugin {
    /// Starts it with `extra` arguments (`--grace-secs 1`, `--owner 0:0`) and waits for its
    /// `ready` line.
    pub fn start(root: &Path, kubelet: &Kubelet, state: &Path, extra: &[&str]) -> Plugin {
        use std::io::BufRead;
        let mut child = std::process::Command::new(crate::prereq::binary("umdev-k8s"))
            .arg("--root")
            .arg(root)
            .arg("--kubelet-dir")
            .arg(&kubelet.dir)
            .arg("--pod-resources")
            .arg(&kubelet.pod_resources)
            .arg("--state-dir")
            .arg(state)
            .args(["--interval-ms", "100"])
            .args(extra)
            .env("UMDEV_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn umdev-k8s: {e}"));
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        let first = lines.next().and_then(Result::ok);
        assert_eq!(first.as_deref(), Some("ready"), "umdev-k8s did not start");
        Plugin { child }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
    }
}
