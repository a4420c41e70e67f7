//! The control protocol between `volfs` and `volfs-mountd`: one JSON request and one JSON
//! response per connection, each a single line, over a unix socket (mode 0600).
//!
//! ```text
//! → {"op":"create","name":"data"}            ← {"ok":true,"volume":{"name":"data",...}}
//! → {"op":"ls"}                              ← {"ok":true,"volumes":[...]}
//! → {"op":"mount","name":"data","path":"/mnt/d","read_only":false}   ← {"ok":true}
//! → {"op":"umount","path":"/mnt/d"}          ← {"ok":true}
//! → {"op":"shutdown"}                        ← {"ok":true}   (after unmounting everything)
//! ← {"ok":false,"error":"what failed, on what, and what to do"}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the CLI and daemon meet unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/volfs/volfs.sock";
/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Create {
        name: String,
    },
    Ls,
    Mount {
        name: String,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    Umount {
        path: PathBuf,
    },
    /// Unmount everything, stop the keeper and exit (the mount table is kept).
    Shutdown,
}

/// One mount of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What `ls` and `create` report of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub mounts: Vec<MountInfo>,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeInfo>>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn err(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Response::default()
        }
    }
}

/// Parses one request line, with a message that says what was wrong.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

/// Sends one request to the daemon and waits for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => format!(
            "volfs-mountd is not running (nothing answers on {}). Start it with \
             `volfs-mountd --root /var/lib/volfs &` (or `scripts/up`), or point \
             --socket / VOLFS_SOCKET at the daemon's socket",
            socket.display()
        ),
        Some(libc::EACCES) => format!(
            "permission denied on {}: the control socket is root-only; run volfs as root",
            socket.display()
        ),
        _ => format!(
            "cannot connect to volfs-mountd at {}: {e}",
            socket.display()
        ),
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .map_err(|e| format!("sending the request to volfs-mountd: {e}"))?;
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .map_err(|e| format!("reading volfs-mountd's answer: {e}"))?;
    if answer.is_empty() {
        return Err("volfs-mountd closed the connection without answering (see its log)".into());
    }
    serde_json::from_str(&answer).map_err(|e| format!("unreadable answer from volfs-mountd: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_a_clear_error() {
        let r = Request::Mount {
            name: "a".into(),
            path: "/m".into(),
            read_only: true,
        };
        let line = serde_json::to_vec(&r).expect("serializable");
        assert_eq!(decode_request(&line), Ok(r));
        for bad in [
            &b"{"[..],
            b"{\"op\":\"nope\"}",
            b"{\"op\":\"create\"}",
            b"\xff\xfe",
            b"",
        ] {
            assert!(decode_request(bad).is_err(), "{bad:?}");
        }
        assert!(decode_request(&vec![b' '; MAX_REQUEST + 1]).is_err());
    }
}
