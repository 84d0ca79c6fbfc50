//! The control API: one JSON object per line over a UNIX socket, a request from the client
//! and one response from the daemon. Errors carry an errno and a message.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
        /// The driver's options, which the driver checks (values may be text).
        #[serde(default)]
        options: Map<String, Value>,
    },
    /// The parent drivers the daemon knows, with their options.
    Drivers,
    /// Changes the owner and mode of an active device's directory and sockets.
    Access {
        /// The device.
        uuid: String,
        /// `user[:group]`, names or numbers.
        owner: Option<String>,
        /// Octal mode of the sockets (the directory gets search permission to match).
        mode: Option<String>,
    },
    /// A display device's current scan-out; the reply carries the memory's fd.
    DisplayPlane {
        /// The device.
        uuid: String,
    },
    /// Every device's counters (and the processes'), in the Prometheus text format.
    Stats,
    /// Live upgrade (worker isolation): the worker of IOMMU group `group`, or every worker,
    /// is replaced by a new process of the daemon's binary as it is on disk now, which
    /// takes the devices over with their clients attached (a pause, not a reset).
    Upgrade {
        /// Only this group's worker (`None`: every worker).
        #[serde(default)]
        group: Option<u32>,
    },
    /// Stops the daemon. With worker isolation a stop leaves the workers serving their
    /// clients (the next daemon adopts them) unless `remove_devices`, which removes every
    /// device first, as a stop in thread mode always does.
    Shutdown {
        /// Remove every device (and so end every worker) too.
        #[serde(default)]
        remove_devices: bool,
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
    /// `running` or `worker-died` (its worker process died and is being started again),
    /// when active.
    #[serde(default)]
    pub state: Option<String>,
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

/// One option of a parent driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverOption {
    /// Its key.
    pub name: String,
    /// What it takes (`integer 1..=4096`, `bool`, `one of socket|pty|none`, ...).
    pub kind: String,
    /// Its default, if it has one.
    pub default: Option<String>,
    /// What it does.
    pub help: String,
}

/// A parent driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverEntry {
    /// Its name, the prefix of its type ids.
    pub name: String,
    /// What its devices are.
    pub description: String,
    /// Its options.
    pub options: Vec<DriverOption>,
}

/// A display's scan-out (the memory's fd travels with the reply).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneInfo {
    /// DRM fourcc of the pixel format.
    pub fourcc: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per line.
    pub stride: u32,
    /// Offset of the first pixel in the memory.
    pub offset: u64,
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

/// What a live upgrade did to one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeEntry {
    /// Its devices.
    pub devices: Vec<String>,
    /// Each device's pause in microseconds, measured at the server (the old worker's pause
    /// to the new worker's resume); empty when the upgrade failed.
    pub paused_us: Vec<(String, u64)>,
    /// Why it failed (the worker serves on as before), if it did.
    pub error: Option<String>,
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
    /// The drivers, in registration order.
    Drivers {
        /// The drivers.
        drivers: Vec<DriverEntry>,
    },
    /// Counters in the Prometheus text format.
    Metrics {
        /// The text.
        text: String,
    },
    /// A live upgrade's outcome, per worker.
    Upgraded {
        /// The workers.
        workers: Vec<UpgradeEntry>,
    },
    /// A display plane; its memory's fd is attached to the reply.
    Plane {
        /// Where the pixels are.
        plane: PlaneInfo,
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
        self.call_with_fds(req).map(|(r, _)| r)
    }

    /// Sends `req` and reads the response with the fds that came with it (a display
    /// plane's memory).
    pub fn call_with_fds(&self, req: &Request) -> Result<(Response, Vec<OwnedFd>), ClientError> {
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
        let (answer, fds) = read_line_with_fds(&stream).map_err(ClientError::Io)?;
        let r = serde_json::from_slice(&answer).map_err(ClientError::Decode)?;
        Ok((r, fds))
    }
}

/// Most bytes a response line may take (a listing of thousands of devices fits).
const MAX_LINE: usize = 64 << 20;

/// Reads one line (up to and without its newline) and any fds sent with it.
fn read_line_with_fds(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        // Peek-free: the daemon writes exactly one line and closes, so nothing follows it.
        let r = match recvmsg(stream, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if r.bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "umdevd closed the connection before answering",
            ));
        }
        line.extend_from_slice(&buf[..r.bytes]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok((line, fds));
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response line too long",
            ));
        }
    }
}

/// `KEY=VALUE` pairs (a command line's `--opt`s) as a driver's options table; values stay
/// text, which the driver parses into the kinds it declares.
pub fn options_from_pairs(pairs: &[String]) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("option {p:?} is not KEY=VALUE"))?;
        if k.is_empty() {
            return Err(format!("option {p:?} has no key"));
        }
        m.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(m)
}

/// Reads one request line from `stream` (at most 1 MiB).
pub fn read_request(stream: &UnixStream) -> std::io::Result<Result<Request, serde_json::Error>> {
    let mut line = String::new();
    std::io::Read::take(BufReader::new(stream), 1 << 20).read_line(&mut line)?;
    Ok(serde_json::from_str(&line))
}

/// Writes one response line to `stream`.
pub fn write_response(stream: &UnixStream, r: &Response) -> std::io::Result<()> {
    write_response_with_fds(stream, r, &[])
}

/// Writes one response line to `stream` with `fds` attached to its first bytes.
pub fn write_response_with_fds(
    mut stream: &UnixStream,
    r: &Response,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut line = serde_json::to_string(r).map_err(std::io::Error::other)?;
    line.push('\n');
    let bytes = line.as_bytes();
    let mut sent = 0;
    if !fds.is_empty() {
        let mut space =
            vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other("too many fds for one message"));
        }
        let iov = [std::io::IoSlice::new(bytes)];
        sent = loop {
            match sendmsg(stream, &iov, &mut cmsg, SendFlags::NOSIGNAL) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
    }
    stream.write_all(&bytes[sent..])
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
