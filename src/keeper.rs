//! The keeper: a small process that holds a copy of every mount's `/dev/fuse` descriptor,
//! so that a FUSE connection outlives the daemon serving it (clean stop, crash, upgrade).
//! The kernel aborts a connection only when its last descriptor closes; while the keeper
//! holds one, requests wait in the kernel until the next daemon takes the descriptors back
//! and has the kernel resend what the old one left unanswered.
//!
//! Protocol: a SOCK_SEQPACKET socket at `ROOT/keeper.sock` (mode 0600), one JSON message
//! per packet, a descriptor attached with SCM_RIGHTS where noted:
//!
//! ```text
//! → {"op":"hold","mount":{"path":..,"volume":..,"read_only":..}} + fd   ← {"ok":true}
//! → {"op":"release","path":"/mnt/x"}                                    ← {"ok":true}
//! → {"op":"list"}        ← {"held":{..}} + fd, one per mount, then {"ok":true}
//! → {"op":"ping"}        ← {"ok":true}
//! → {"op":"exit"}        ← {"ok":true}; the keeper closes everything and exits
//! ```
//!
//! The keeper drops a descriptor whose connection the kernel aborted (its mount is gone),
//! and exits by itself once it holds nothing and no daemon is connected.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

/// One mount whose connection the keeper holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMount {
    pub path: PathBuf,
    pub volume: String,
    pub read_only: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Msg {
    Hold { mount: HeldMount },
    Release { path: PathBuf },
    List,
    Ping,
    Exit,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    #[serde(default)]
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held: Option<HeldMount>,
}

const MAX_MSG: usize = 64 * 1024;

pub fn socket_path(root: &Path) -> PathBuf {
    root.join("keeper.sock")
}

pub fn pid_path(root: &Path) -> PathBuf {
    root.join("keeper.pid")
}

/// Takes ownership of descriptors the kernel just installed for this process (SCM_RIGHTS,
/// accept): nothing else refers to them.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by accept(2) or received with SCM_RIGHTS just now, is
    // open, and has no other owner in this process.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn send(
    sock: BorrowedFd<'_>,
    body: &impl Serialize,
    fd: Option<BorrowedFd<'_>>,
) -> nix::Result<()> {
    let bytes = serde_json::to_vec(body).map_err(|_| nix::errno::Errno::EINVAL)?;
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

/// One packet and the descriptors that came with it; `None` at end of stream.
fn recv(sock: BorrowedFd<'_>) -> nix::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            fds.extend(v.into_iter().map(adopt));
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn connect_to(path: &Path) -> nix::Result<OwnedFd> {
    let s = seqpacket()?;
    connect(s.as_raw_fd(), &UnixAddr::new(path)?)?;
    let t = TimeVal::new(10, 0);
    setsockopt(&s, sockopt::ReceiveTimeout, &t)?;
    setsockopt(&s, sockopt::SendTimeout, &t)?;
    Ok(s)
}

/// The keeper process's main loop (`volfs-mountd --keeper --root ROOT`).
pub fn serve(root: &Path) -> Result<(), String> {
    let path = socket_path(root);
    if connect_to(&path).is_ok() {
        tracing::info!("a keeper already runs for {}", root.display());
        return Ok(());
    }
    let _ = std::fs::remove_file(&path);
    let listener = seqpacket().map_err(|e| format!("keeper socket: {e}"))?;
    let addr =
        UnixAddr::new(&path).map_err(|e| format!("keeper socket {}: {e}", path.display()))?;
    bind(listener.as_raw_fd(), &addr).map_err(|e| format!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    listen(&listener, Backlog::new(8).map_err(|e| e.to_string())?)
        .map_err(|e| format!("listening on {}: {e}", path.display()))?;
    let _ = std::fs::write(pid_path(root), format!("{}\n", std::process::id()));
    tracing::info!(
        pid = std::process::id(),
        "keeper holding FUSE connections for {}",
        root.display()
    );

    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut held: Vec<(HeldMount, OwnedFd)> = Vec::new();
    let born = Instant::now();
    let mut ever_connected = false;
    loop {
        if clients.is_empty()
            && held.is_empty()
            && (ever_connected || born.elapsed() > Duration::from_secs(30))
        {
            break;
        }
        let revents: Vec<PollFlags> = {
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(1 + clients.len() + held.len());
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            fds.extend(
                clients
                    .iter()
                    .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
            );
            // No events asked: poll still reports POLLERR once a connection is aborted.
            fds.extend(
                held.iter()
                    .map(|(_, f)| PollFd::new(f.as_fd(), PollFlags::empty())),
            );
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                    .collect(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("keeper poll: {e}")),
            }
        };
        let bad = PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL;
        // Dead connections first (indexes shift as entries go).
        let (nc, nh) = (clients.len(), held.len());
        for i in (0..nh).rev() {
            if revents[1 + nc + i].intersects(bad) {
                let (m, _) = held.remove(i);
                tracing::info!(path = %m.path.display(), "keeper: connection ended, dropping it");
            }
        }
        let mut exit = false;
        for i in (0..nc).rev() {
            let r = revents[1 + i];
            if r.is_empty() {
                continue;
            }
            let keep = r.contains(PollFlags::POLLIN) && handle(&clients[i], &mut held, &mut exit);
            if !keep {
                clients.remove(i);
            }
        }
        if exit {
            tracing::info!(
                "keeper: asked to exit; releasing {} connection(s)",
                held.len()
            );
            break;
        }
        if revents[0].contains(PollFlags::POLLIN) {
            if let Ok(fd) = accept(listener.as_raw_fd()) {
                let c = adopt(fd);
                let _ = nix::fcntl::fcntl(
                    c.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                clients.push(c);
                ever_connected = true;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(pid_path(root));
    Ok(())
}

/// Answers one message; false when the client is gone.
fn handle(c: &OwnedFd, held: &mut Vec<(HeldMount, OwnedFd)>, exit: &mut bool) -> bool {
    let Ok(Some((bytes, mut fds))) = recv(c.as_fd()) else {
        return false;
    };
    let ok = Answer {
        ok: true,
        ..Answer::default()
    };
    let answer = match serde_json::from_slice::<Msg>(&bytes) {
        Ok(Msg::Hold { mount }) => match fds.pop() {
            Some(fd) => {
                held.retain(|(m, _)| m.path != mount.path);
                held.push((mount, fd));
                ok
            }
            None => Answer {
                error: Some("hold without a descriptor".into()),
                ..Answer::default()
            },
        },
        Ok(Msg::Release { path }) => {
            held.retain(|(m, _)| m.path != path);
            ok
        }
        Ok(Msg::List) => {
            for (m, fd) in held.iter() {
                let item = Answer {
                    ok: true,
                    held: Some(m.clone()),
                    ..Answer::default()
                };
                if send(c.as_fd(), &item, Some(fd.as_fd())).is_err() {
                    return false;
                }
            }
            ok
        }
        Ok(Msg::Ping) => ok,
        Ok(Msg::Exit) => {
            *exit = true;
            held.clear();
            ok
        }
        Err(e) => Answer {
            error: Some(format!("malformed keeper message: {e}")),
            ..Answer::default()
        },
    };
    send(c.as_fd(), &answer, None).is_ok()
}

/// The daemon's side: a connection to the keeper, started if none runs.
pub struct Keeper {
    root: PathBuf,
    conn: Mutex<Option<OwnedFd>>,
}

impl Keeper {
    pub fn new(root: &Path) -> Keeper {
        Keeper {
            root: root.to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    /// Connects to the running keeper or starts one; true if one was already running.
    pub fn connect(&self) -> Result<bool, String> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let path = socket_path(&self.root);
        if let Ok(s) = connect_to(&path) {
            *conn = Some(s);
            return Ok(true);
        }
        // /proc/self/exe still runs after an upgrade replaced (and so unlinked) the binary.
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg("--keeper")
            .arg("--root")
            .arg(&self.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // Its own process group: a Ctrl-C meant for the daemon does not reach it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the keeper process: {e}"))?;
        let t0 = Instant::now();
        loop {
            if let Ok(s) = connect_to(&path) {
                *conn = Some(s);
                // Reap it whenever it exits.
                let _ = std::thread::Builder::new()
                    .name("keeper-reaper".into())
                    .spawn(move || child.wait());
                return Ok(false);
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "the keeper process exited at start ({st}); see the log"
                ));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return Err(format!(
                    "the keeper process did not open {} within 10 s",
                    path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn call(
        &self,
        msg: &Msg,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Vec<(HeldMount, OwnedFd)>, String> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let r = Self::exchange(conn.as_ref(), msg, fd);
        if r.is_err() {
            // Half-read answers would be taken for the next call's: start afresh.
            *conn = None;
        }
        r
    }

    fn exchange(
        conn: Option<&OwnedFd>,
        msg: &Msg,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Vec<(HeldMount, OwnedFd)>, String> {
        let s = conn.ok_or("not connected to the keeper")?;
        send(s.as_fd(), msg, fd).map_err(|e| format!("talking to the keeper: {e}"))?;
        let mut items = Vec::new();
        loop {
            let (bytes, mut fds) = recv(s.as_fd())
                .map_err(|e| format!("reading the keeper's answer: {e}"))?
                .ok_or("the keeper closed the connection")?;
            let a: Answer = serde_json::from_slice(&bytes)
                .map_err(|e| format!("unreadable answer from the keeper: {e}"))?;
            if let Some(e) = a.error {
                return Err(format!("keeper: {e}"));
            }
            match (a.held, fds.pop()) {
                (Some(m), Some(fd)) => items.push((m, fd)),
                (Some(m), None) => {
                    tracing::warn!(path = %m.path.display(), "keeper listed a mount without its descriptor")
                }
                (None, _) => return Ok(items),
            }
        }
    }

    pub fn hold(&self, m: &HeldMount, fd: BorrowedFd<'_>) -> Result<(), String> {
        self.call(&Msg::Hold { mount: m.clone() }, Some(fd))
            .map(|_| ())
    }

    pub fn release(&self, path: &Path) -> Result<(), String> {
        self.call(
            &Msg::Release {
                path: path.to_path_buf(),
            },
            None,
        )
        .map(|_| ())
    }

    pub fn list(&self) -> Result<Vec<(HeldMount, OwnedFd)>, String> {
        self.call(&Msg::List, None)
    }

    pub fn ping(&self) -> bool {
        self.call(&Msg::Ping, None).is_ok()
    }

    /// Tells the keeper to let go of everything and exit.
    pub fn exit(&self) -> Result<(), String> {
        self.call(&Msg::Exit, None).map(|_| ())
    }
}
