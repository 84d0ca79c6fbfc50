//! A whole server session fed the bytes a client would send.
//!
//! Input: one mode byte, then the raw byte stream. Mode bit 0 clear puts a valid VERSION
//! message in front of the stream, so most inputs get past negotiation; bit 1 asks for
//! `write_multiple` in it. Wherever the stream holds [`FD_MARK`], the marker is cut out and
//! a fresh 64 KiB memfd travels with the bytes that follow it, as a DMA_MAP or SET_IRQS
//! would carry one (the server writes interrupt counts to it like to an eventfd).
//!
//! The device is small but reaches the framework's paths: BAR0 is scratch memory with a few
//! doorbells that do DMA and raise interrupts, BAR2 holds the MSI-X table and PBA, BAR4 is
//! port I/O. `serve_transport` must return, `Ok` or `Err`, and never panic; every message
//! the server sends must be well-formed.
#![no_main]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::ToyDevice;
use libfuzzer_sys::fuzz_target;
use umdev_pci::{BarKind, PciDeviceSpec, PciFunction};
use umdev_proto::{wire, Capabilities, Command, Header, HEADER_SIZE};
use umdev_server::{Server, ServerConfig};
use umdev_transport::{Incoming, MemoryTransport, RecvLimits, Transport, TransportError};
use zerocopy::IntoBytes;

/// Cut out of the stream; the bytes after it carry a memfd.
const FD_MARK: &[u8] = b"FD!\n";

/// Size of each BAR of the device (BAR4, port I/O, is smaller).
const BAR_SIZE: usize = 4096;
const IO_BAR_SIZE: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    run(mode, stream);
});

fn run(mode: u8, stream: &[u8]) {
    let server = Server::new(function(), config()).expect("an eventfd for the server");
    let (client, server_end) = MemoryTransport::pair();
    if mode & 1 == 0 {
        client
            .send_raw(&version_message(mode & 2 != 0), &[])
            .expect("the server end is open");
    }
    let mut chunks = split_marks(stream).into_iter();
    if let Some(first) = chunks.next() {
        client.send_raw(first, &[]).expect("the server end is open");
    }
    for chunk in chunks {
        let fd = memfd();
        client
            .send_raw(chunk, &[fd.as_fd()])
            .expect("the server end is open");
    }
    // Dropping the client is end-of-stream for the server, after every byte sent. The memory
    // pipe is unbounded, so nothing blocks: the server sends into the checker below, which
    // keeps no client to read replies and needs no thread to drain them.
    drop(client);
    let transport = Arc::new(Checked { inner: server_end });
    let _ = server.serve_transport(transport);
}

fn config() -> ServerConfig {
    ServerConfig {
        // Small, so that the fuzzer can reach the transfer-size checks with small inputs.
        max_data_xfer_size: 4096,
        max_msg_fds: 4,
        max_dma_maps: 8,
        spin: Duration::ZERO,
        dma_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    }
}

fn function() -> PciFunction {
    let spec = PciDeviceSpec::builder(0x1b36, 0x0005)
        .class(0xff, 0, 0)
        .interrupt_pin(1)
        .bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            BAR_SIZE as u64,
        )
        .bar(2, BarKind::Mem64 { prefetchable: true }, BAR_SIZE as u64)
        .bar(4, BarKind::Io, IO_BAR_SIZE as u64)
        .msi(4, true)
        .msix(8, 2, 0, 2, 0x800)
        .power_management()
        .build()
        .expect("the fuzz device's spec is valid");
    PciFunction::new(
        spec,
        Box::new(ToyDevice::new([BAR_SIZE, BAR_SIZE, IO_BAR_SIZE], &[])),
    )
}

fn version_message(write_multiple: bool) -> Vec<u8> {
    let caps = Capabilities {
        max_msg_fds: Some(4),
        max_data_xfer_size: Some(4096),
        write_multiple: write_multiple.then_some(true),
        ..Capabilities::default()
    }
    .to_wire();
    let version = wire::Version { major: 0, minor: 1 };
    let body_len = version.as_bytes().len() + caps.len();
    let header = Header::command(0, Command::Version, body_len).expect("a small message");
    umdev_proto::encode(&header, &[version.as_bytes(), &caps])
}

/// The stream cut at every [`FD_MARK`], markers removed.
fn split_marks(stream: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut rest = stream;
    while let Some(at) = rest.windows(FD_MARK.len()).position(|w| w == FD_MARK) {
        chunks.push(&rest[..at]);
        rest = &rest[at + FD_MARK.len()..];
    }
    chunks.push(rest);
    chunks
}

fn memfd() -> OwnedFd {
    let fd = rustix::fs::memfd_create("umdev-fuzz", rustix::fs::MemfdFlags::CLOEXEC)
        .expect("memfd_create");
    rustix::fs::ftruncate(&fd, 64 * 1024).expect("ftruncate of a memfd");
    fd
}

/// `UMDEV_FUZZ_TRACE=1` prints every message the server sends: for reading what one input
/// does (`target/.../session INPUT_FILE` runs just that input).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("UMDEV_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

/// The server's end of the connection: reads from the memory pipe, and checks then drops
/// every message the server sends.
struct Checked {
    inner: MemoryTransport,
}

impl Checked {
    fn check(header: &Header, parts: &[&[u8]]) {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        assert_eq!(
            header.msg_size as usize,
            HEADER_SIZE + body,
            "msg_size does not match the message: {header:?}"
        );
        assert_eq!(
            header.flags & !umdev_proto::FLAGS_KNOWN,
            0,
            "unknown flag bits: {header:?}"
        );
        assert!(!header.no_reply(), "the server set No_reply: {header:?}");
        if header.is_reply() {
            if header.error().is_some() {
                assert_eq!(body, 0, "an error reply with a body: {header:?}");
                assert_ne!(
                    header.error, 0,
                    "an error reply without an errno: {header:?}"
                );
            } else {
                assert_eq!(header.error, 0, "a success reply with an errno: {header:?}");
            }
        } else {
            // The only commands a server sends are its DMA requests.
            assert!(header.is_command(), "neither command nor reply: {header:?}");
            assert!(
                matches!(
                    header.known_command(),
                    Some(Command::DmaRead | Command::DmaWrite)
                ),
                "the server sent command {}: {header:?}",
                header.command
            );
        }
    }
}

impl Transport for Checked {
    fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        _fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        Self::check(header, parts);
        if trace() {
            eprintln!("server sent {header:?}");
        }
        Ok(())
    }

    fn recv(&self, limits: RecvLimits) -> Result<Incoming, TransportError> {
        self.inner.recv(limits)
    }

    fn send_raw(&self, _bytes: &[u8], _fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        panic!("the server sent raw bytes");
    }

    fn wait_readable(&self, timeout: std::time::Duration) -> Result<bool, TransportError> {
        self.inner.wait_readable(timeout)
    }

    fn shutdown(&self) {
        self.inner.shutdown();
    }
}
