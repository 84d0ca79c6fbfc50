//! The kubelet's gRPC APIs (messages and services generated from `proto/` at build time).

/// The device-plugin API, v1beta1.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}

/// The pod-resources API, v1.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod podresources {
    tonic::include_proto!("v1");
}

/// The API version a plugin registers with.
pub const VERSION: &str = "v1beta1";
/// A device the kubelet may hand out.
pub const HEALTHY: &str = "Healthy";
/// A device the kubelet must not hand out.
pub const UNHEALTHY: &str = "Unhealthy";
/// The kubelet's registration socket, in its device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
