//! umdev-k8s: a Kubernetes device plugin that offers a node's umdev mediated devices to its
//! kubelet, so that a scheduler hands them to VM pods.
//!
//! It is a client of umdev's public interfaces only: the sysfs ABI of the FUSE tree (as
//! KubeVirt is of the kernel's) to list types and create and remove devices, and the control
//! API to give a device's socket to the pod's VMM user. One extended resource per mdev type
//! (`<prefix>/<type-id>`), one `DevicePlugin` server per resource.
//!
//! - [`api`]: the kubelet's gRPC APIs (device plugin v1beta1, pod resources v1).
//! - [`tree`]: the umdev sysfs ABI.
//! - [`plugin`]: slots, `ListAndWatch`, `Allocate`.
//! - [`kubelet`]: serving, registering, re-registering, cleaning up.
//! - [`checkpoint`]: what was handed out, across restarts.
#![warn(missing_docs)]

pub mod api;
pub mod checkpoint;
pub mod kubelet;
pub mod plugin;
pub mod tree;
