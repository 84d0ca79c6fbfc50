//! The control API's decoding on arbitrary bytes: what `umdevd` reads from its control
//! socket and its definition store, and what `umdevctl` reads back.
//!
//! The same input is, at once:
//!
//! - a request line: `serde_json` into `Request` directly, and through `read_request` over a
//!   socket pair (which reads up to the first newline); both must agree;
//! - a response line (`Response`), as the client decodes it;
//! - `KEY=VALUE` lines (one per line, as `umdevctl --opt` gives them) for
//!   `options_from_pairs`, whose answer is checked against its documented rule;
//! - an mdevctl definition file (`Definition::parse`).
//!
//! Nothing may panic. What parses must survive serialising and parsing again unchanged: a
//! request or response as one JSON line with no raw newline in it, a definition as the text
//! mdevctl writes and as a JSON value.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use umdev_api::control::{options_from_pairs, read_request};
use umdev_api::{Definition, Request, Response};

/// Most bytes sent through the socket: a socket buffer holds them, so that the write never
/// waits for the reader (which runs after it, on the same thread).
const SOCKET_MAX: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    request(data);
    request_line(data);
    response(data);
    options(data);
    definition(data);
});

fn request(data: &[u8]) {
    let Ok(r) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let line = serde_json::to_string(&r).expect("a request serialises");
    assert!(
        !line.contains('\n'),
        "a request line holds a newline: {line}"
    );
    match serde_json::from_str::<Request>(&line) {
        Ok(back) => assert_eq!(back, r, "the request changed through {line}"),
        Err(e) => panic!("{line} does not parse back: {e}"),
    }
}

/// `read_request` reads the first line (with its newline) and parses it: the same answer as
/// parsing that line directly, and an I/O error only for a line that is not UTF-8.
fn request_line(data: &[u8]) {
    let data = &data[..data.len().min(SOCKET_MAX)];
    let (mut client, server) = UnixStream::pair().expect("a socket pair");
    client.write_all(data).expect("the write fits the socket");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown of a connected socket");
    let got = read_request(&server);
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(end) => &data[..=end],
        None => data,
    };
    match (std::str::from_utf8(line), got) {
        (Ok(text), Ok(got)) => {
            let want = serde_json::from_str::<Request>(text);
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "read_request and from_str differ"),
                (Err(_), Err(_)) => {}
                (g, w) => panic!("read_request says {g:?}, from_str says {w:?}"),
            }
        }
        (Ok(_), Err(e)) => panic!("read_request failed on a UTF-8 line: {e}"),
        (Err(_), Ok(r)) => panic!("read_request took a line that is not UTF-8: {r:?}"),
        (Err(_), Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
    }
}

fn response(data: &[u8]) {
    let Ok(r) = serde_json::from_slice::<Response>(data) else {
        return;
    };
    let line = serde_json::to_string(&r).expect("a response serialises");
    assert!(
        !line.contains('\n'),
        "a response line holds a newline: {line}"
    );
    match serde_json::from_str::<Response>(&line) {
        Ok(back) => assert_eq!(back, r, "the response changed through {line}"),
        Err(e) => panic!("{line} does not parse back: {e}"),
    }
}

/// The rule: every pair has a `=` after a non-empty key, else the first that does not is
/// the error; later keys replace earlier ones; values stay text.
fn options(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<String> = text.lines().map(str::to_owned).collect();
    let got = options_from_pairs(&pairs);
    let bad = pairs
        .iter()
        .position(|p| p.split_once('=').is_none_or(|(k, _)| k.is_empty()));
    match (got, bad) {
        (Ok(map), None) => {
            for p in &pairs {
                let (k, _) = p.split_once('=').expect("checked above");
                let last = pairs
                    .iter()
                    .rev()
                    .find_map(|q| q.split_once('=').filter(|(qk, _)| qk == &k))
                    .map(|(_, v)| v);
                assert_eq!(
                    map.get(k).and_then(|v| v.as_str()),
                    last,
                    "option {k:?} is not the last value given"
                );
            }
            assert!(map.len() <= pairs.len());
        }
        (Err(e), Some(i)) => assert!(
            e.contains(&format!("{:?}", pairs[i])),
            "the error names another option than the first bad one ({:?}): {e}",
            pairs[i]
        ),
        (Ok(map), Some(i)) => panic!("{:?} accepted: {map:?}", pairs[i]),
        (Err(e), None) => panic!("every pair is KEY=VALUE, yet: {e}"),
    }
}

fn definition(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(d) = Definition::parse(text) else {
        return;
    };
    let written = d.to_text();
    match Definition::parse(&written) {
        Ok(back) => assert_eq!(back, d, "the definition changed through\n{written}"),
        Err(e) => panic!("mdevctl's text of a definition does not parse: {e}\n{written}"),
    }
    match Definition::from_json(&d.to_json()) {
        Ok(back) => assert_eq!(back, d, "the definition changed through to_json"),
        Err(e) => panic!("to_json of a definition does not parse: {e}"),
    }
}
