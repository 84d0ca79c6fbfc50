//! The control API: one JSON object per line over a UNIX socket, a request from the client
//! and one response from the daemon. Errors carry an errno and a message.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where `umdevd` listens by default (its state directory's `control.sock`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/umdev/state/control.sock";

/// What a client asks. The options are mdevctl's, with the same meaning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The parents' types.
    Types {
        /// Only this parent.
        parent: Option<String>,
    },
    /// Active devices, or defined ones.
    List {
        /// Defined devices instead of active ones.
        defined: bool,
        /// Only this device.
        uuid: Option<String>,
        /// Only this parent.
        parent: Option<String>,
    },
    /// Stores a definition (of an active device, or of parent and type).
    Define {
        /// The device (else a new UUID).
        uuid: Option<String>,
        /// Its parent.
        parent: Option<String>,
        /// Its type.
        mdev_type: Option<String>,
        /// Start with its parent.
        auto: bool,
        /// A whole definition in mdevctl's JSON format.
        json: Option<Value>,
        /// Go on despite a sysfs error.
        force: bool,
    },
    /// Removes a definition.
    Undefine {
        /// The device.
        uuid: String,
        /// Its parent, when it is defined under several.
        parent: Option<String>,
    },
    /// Edits a definition.
    Modify(ModifyRequest),
    /// Creates a device: a defined one, or a new one of parent and type.
    Start {
        /// The device (else a new UUID).
        uuid: Option<String>,
        /// Its parent.
        parent: Option<String>,
        /// Its type.
        mdev_type: Option<String>,
        /// A definition to start from.
        json: Option<Value>,
    },
    /// Removes an active device.
    Stop {
        /// The device.
        uuid: String,
    },
    /// A device's vfio-user socket.
    Socket {
        /// The device.
        uuid: String,
    },
    /// The IOMMU groups and who holds them.
    Groups,
    /// Registers a parent device at run time; its auto-start definitions are created.
    AddParent {
        /// The parent's name (`mtty2`).
        name: String,
        /// Its driver (`mtty`).
        driver: String,
        /// Its pool size (mtty: ports, default 24).
        ports: Option<u32>,
        /// Where mtty ports' host sides go: `socket` (default), `pty` or `none`.
        console: Option<String>,
        /// Whether its types share peer-to-peer resources.
        peer_to_peer: bool,
    },
    /// Unregisters a parent and removes its devices (EBUSY while one is held, unless
    /// `force`).
    RemoveParent {
        /// The parent's name.
        name: String,
        /// Take held devices away from their clients.
        force: bool,
    },
}

/// What `Request::Modify` changes in a definition (mdevctl's `modify` options).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModifyRequest {
    /// The device.
    pub uuid: String,
    /// Its parent.
    pub parent: Option<String>,
    /// A new type.
    pub mdev_type: Option<String>,
    /// Adds this attribute (with `value`, at `index`).
    pub addattr: Option<String>,
    /// Deletes the attribute at `index` (else the last).
    pub delattr: bool,
    /// Attribute position.
    pub index: Option<u32>,
    /// Value of the added attribute.
    pub value: Option<String>,
    /// Start with the parent from now on.
    pub auto: bool,
    /// Start only on request from now on.
    pub manual: bool,
    /// A whole new definition.
    pub json: Option<Value>,
}

/// One type of one parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeEntry {
    /// The parent.
    pub parent: String,
    /// The type id.
    pub id: String,
    /// How many more can be created.
    pub available_instances: u32,
    /// `vfio-pci`.
    pub device_api: String,
    /// Human name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
}

/// One device, active or defined or both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The UUID.
    pub uuid: String,
    /// The parent.
    pub parent: String,
    /// The type id.
    pub mdev_type: String,
    /// Starts with its parent.
    pub auto: bool,
    /// Exists now.
    pub active: bool,
    /// Has a definition.
    pub defined: bool,
    /// The definition's attributes, in order.
    pub attrs: Vec<(String, String)>,
    /// The vfio-user socket, when active.
    pub socket: Option<String>,
    /// The IOMMU group, when active.
    pub iommu_group: Option<u32>,
}

/// Who holds a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The client's process, when known.
    pub pid: Option<u32>,
    /// The client's user, when known.
    pub uid: Option<u32>,
    /// The server's connection number.
    pub connection: u64,
}

/// One IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    /// Its number.
    pub id: u32,
    /// Its devices.
    pub devices: Vec<String>,
    /// Who holds it.
    pub owner: Option<Holder>,
    /// The shared peer-to-peer resource UUID, for peer-to-peer types.
    pub peer_to_peer: Option<String>,
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// Types, sorted by parent then id.
    Types {
        /// The types.
        types: Vec<TypeEntry>,
    },
    /// Devices, sorted by parent then UUID.
    Devices {
        /// The devices.
        devices: Vec<DeviceEntry>,
    },
    /// A device was defined or started under this UUID.
    Uuid {
        /// The UUID.
        uuid: String,
    },
    /// Done.
    Done,
    /// A device's socket.
    Socket {
        /// The UUID.
        uuid: String,
        /// The socket path.
        path: String,
    },
    /// The groups.
    Groups {
        /// By number.
        groups: Vec<GroupEntry>,
    },
    /// The request failed.
    Error {
        /// An errno describing it.
        errno: i32,
        /// What failed.
        message: String,
    },
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot reach umdevd at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to umdevd")]
    Io(#[source] std::io::Error),
    /// The answer was not understood.
    #[error("umdevd sent an answer this client does not understand")]
    Decode(#[source] serde_json::Error),
}

/// A client of the control socket.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the daemon listening at `path`.
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Sends `req` on a new connection and reads the response.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(ClientError::Io)?;
        let mut line = serde_json::to_string(req).map_err(ClientError::Decode)?;
        line.push('\n');
        (&stream)
            .write_all(line.as_bytes())
            .map_err(ClientError::Io)?;
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .map_err(ClientError::Io)?;
        serde_json::from_str(&answer).map_err(ClientError::Decode)
    }
}

/// Reads one request line from `stream` (at most 1 MiB).
pub fn read_request(stream: &UnixStream) -> std::io::Result<Result<Request, serde_json::Error>> {
    let mut line = String::new();
    std::io::Read::take(BufReader::new(stream), 1 << 20).read_line(&mut line)?;
    Ok(serde_json::from_str(&line))
}

/// Writes one response line to `stream`.
pub fn write_response(mut stream: &UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip_as_json_lines() {
        let reqs = [
            Request::Types { parent: None },
            Request::Stop { uuid: "u".into() },
            Request::Groups,
        ];
        for r in reqs {
            let s = serde_json::to_string(&r).unwrap();
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
        let s = serde_json::to_string(&Response::Done).unwrap();
        assert_eq!(s, r#"{"reply":"done"}"#);
    }

    #[test]
    fn a_client_talks_to_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let r = read_request(&s).unwrap().unwrap();
            assert_eq!(r, Request::Groups);
            write_response(&s, &Response::Groups { groups: vec![] }).unwrap();
        });
        let r = Client::new(&path).call(&Request::Groups).unwrap();
        assert_eq!(r, Response::Groups { groups: vec![] });
        t.join().unwrap();
    }
}
