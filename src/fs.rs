//! The FUSE adapter: the only module that knows fuser's types.
//!
//! Each mount gets one [`FuseAdapter`] over the volume's shared [`FileSystem`]; it converts
//! requests into calls of the seam, results into replies (one place maps errors to errnos),
//! and enforces the mount's read-only flag itself, so EROFS holds even for root and even if
//! the kernel's own `ro` flag were bypassed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    Notifier, OpenAccMode, OpenFlags, PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyBmap,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL,
    TimeOrNow, WriteFlags,
};

use crate::error::{FsError, FsResult};
use crate::vfs::{Attr, Ctx, FileKind, FileSystem, RenameFlags, SetAttr, SetTime, Timestamp};

/// How long the kernel may cache entries and attributes while a volume has one mount: every
/// change then goes through that mount's kernel, which keeps its cache right by itself.
/// With several mounts, replies carry a TTL of zero instead (see [`Peers`]).
const TTL: Duration = Duration::from_secs(60);
/// FUSE event loops per mount. They share one `/dev/fuse` descriptor (no clone_fd): the
/// kernel keeps a request that a dying daemon had read on that descriptor's processing
/// list, and FUSE_NOTIFY_RESEND from the next daemon queues it again. A cloned descriptor
/// would end such requests with ECONNABORTED when the daemon dies.
const LOOPS: usize = 4;
const MAX_WRITE: u32 = 1024 * 1024;
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// Notification codes of Linux ≥ 6.9 / 6.16 that fuser 0.18 cannot send.
const FUSE_NOTIFY_RESEND: i32 = 7;
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One mount of a volume.
pub struct FuseAdapter<F: FileSystem> {
    fs: Arc<F>,
    read_only: bool,
    peers: Arc<Peers>,
    me: Arc<MountState>,
    gate: Arc<Gate>,
}

/// Mount-time settings of one mount.
pub struct MountSpec<'a> {
    pub volume: &'a str,
    pub mountpoint: &'a Path,
    pub read_only: bool,
    /// The other mounts of the same volume.
    pub peers: Arc<Peers>,
    /// The daemon-wide request gate.
    pub gate: Arc<Gate>,
}

/// Lets the daemon stop answering before it exits: requests that arrive after
/// [`Gate::freeze`] wait unanswered, and the next daemon has the kernel resend them.
#[derive(Default)]
pub struct Gate {
    frozen: AtomicBool,
    active: AtomicU64,
}

pub struct GatePass<'a>(&'a Gate);

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    fn enter(&self) -> GatePass<'_> {
        loop {
            self.active.fetch_add(1, Ordering::SeqCst);
            if !self.frozen.load(Ordering::SeqCst) {
                return GatePass(self);
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
            // The process is about to exit; this request stays unanswered on purpose.
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    pub fn frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Stops new requests and waits (up to `limit`) for those being answered.
    pub fn freeze(&self, limit: Duration) -> bool {
        self.frozen.store(true, Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        while self.active.load(Ordering::SeqCst) > 0 {
            if t0.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

/// What one mount's kernel is known to cache, so that it can be told to drop it.
pub struct MountState {
    id: u64,
    /// The connection, for notifications fuser cannot send.
    dev: OwnedFd,
    notifier: OnceLock<Notifier>,
    /// Inode → lookup count the kernel holds (entry replies minus forgets), sharded.
    known: Vec<Mutex<HashMap<u64, u64>>>,
    /// Served by an earlier daemon too: `known` misses what the kernel looked up then.
    resumed: bool,
}

const SHARDS: usize = 16;

impl MountState {
    fn new(id: u64, dev: OwnedFd, resumed: bool) -> MountState {
        MountState {
            id,
            dev,
            notifier: OnceLock::new(),
            known: (0..SHARDS).map(|_| Mutex::default()).collect(),
            resumed,
        }
    }

    fn shard(&self, ino: u64) -> MutexGuard<'_, HashMap<u64, u64>> {
        lock(&self.known[(ino as usize) % SHARDS])
    }

    fn looked_up(&self, ino: u64) {
        *self.shard(ino).entry(ino).or_insert(0) += 1;
    }

    /// True once the kernel holds no lookup of `ino` any more, as far as this daemon saw.
    /// An inode looked up only under an earlier daemon counts as forgotten at its first
    /// FORGET: only orphans are reclaimed on that, and an orphan has no name left to be
    /// looked up by, so its FORGET is the kernel's final one (sent at eviction, after the
    /// last close).
    fn forgot(&self, ino: u64, n: u64) -> bool {
        let mut m = self.shard(ino);
        match m.get_mut(&ino) {
            Some(c) if *c > n => {
                *c -= n;
                false
            }
            _ => {
                m.remove(&ino);
                true
            }
        }
    }

    fn known_inodes(&self) -> Vec<u64> {
        self.known
            .iter()
            .flat_map(|s| lock(s).keys().copied().collect::<Vec<_>>())
            .collect()
    }

    fn notify_raw(&self, code: i32) -> std::io::Result<()> {
        notify_raw(self.dev.as_fd(), code)
    }
}

/// Writes a payload-less notification (fuse_out_header with unique 0, error = code).
fn notify_raw(fd: BorrowedFd<'_>, code: i32) -> std::io::Result<()> {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&16u32.to_ne_bytes());
    b[4..8].copy_from_slice(&code.to_ne_bytes());
    nix::unistd::write(fd, &b)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// The live mounts of one volume.
///
/// Coherence between mounts: while a volume has more than one mount, every entry and
/// attribute reply carries a TTL of zero and the kernel runs with FUSE_AUTO_INVAL_DATA (no
/// writeback cache), so each lookup, stat and read asks this daemon first and drops cached
/// pages whose mtime or size changed: a change acknowledged through one mount is seen by
/// the next call through any other. When a second mount arrives, the first one's kernel
/// still holds long TTLs; [`Peers::prepare_join`] makes it drop them (dentry epoch and
/// attribute invalidation) before the new mount is made. Pages mapped with mmap are read
/// without asking anyone, so a write also has the other mounts drop the pages it changed
/// before it is answered ([`Peers::drop_pages`]). Nothing else is invalidated: a
/// notification racing a GETATTR makes the kernel discard that GETATTR's fresh answer.
pub struct Peers {
    next: AtomicU64,
    mounts: Arc<Mutex<Vec<Arc<MountState>>>>,
    multi: AtomicBool,
    /// Handlers that chose the long TTL and have not replied yet.
    granting: AtomicU64,
    queue: Mutex<std::sync::mpsc::Sender<PageInval>>,
}

impl Default for Peers {
    fn default() -> Peers {
        let mounts: Arc<Mutex<Vec<Arc<MountState>>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel::<PageInval>();
        let list = mounts.clone();
        // Ends when the volume's Peers is dropped (the channel closes).
        let _ = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for w in rx {
                    let others: Vec<Arc<MountState>> = lock(&list)
                        .iter()
                        .filter(|m| m.id != w.from)
                        .cloned()
                        .collect();
                    for m in others {
                        if let Some(n) = m.notifier.get() {
                            // ENOENT: that kernel does not cache it; nothing to drop.
                            let _ = n.inval_inode(INodeNo(w.ino), w.offset, w.len);
                        }
                    }
                    let _ = w.done.send(());
                }
            });
        Peers {
            next: AtomicU64::new(0),
            mounts,
            multi: AtomicBool::new(false),
            granting: AtomicU64::new(0),
            queue: Mutex::new(tx),
        }
    }
}

/// Pages of `ino` (`offset..offset+len`, `len` 0: to the end) that other mounts must drop.
struct PageInval {
    from: u64,
    ino: u64,
    offset: i64,
    len: i64,
    done: std::sync::mpsc::SyncSender<()>,
}

/// A reply's cache lifetime, held until the reply is sent.
struct Ttl<'a> {
    ttl: Duration,
    peers: Option<&'a Peers>,
}

impl Drop for Ttl<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.peers {
            p.granting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Peers {
    fn ttl(&self) -> Ttl<'_> {
        self.granting.fetch_add(1, Ordering::SeqCst);
        if self.multi.load(Ordering::SeqCst) {
            self.granting.fetch_sub(1, Ordering::SeqCst);
            return Ttl {
                ttl: Duration::ZERO,
                peers: None,
            };
        }
        Ttl {
            ttl: TTL,
            peers: Some(self),
        }
    }

    pub fn count(&self) -> usize {
        lock(&self.mounts).len()
    }

    /// Called before another mount of the volume is made: from now on replies carry no
    /// TTL, and the present mounts' kernels drop what they were allowed to cache longer.
    /// `all_inodes` lists the volume's inodes, for mounts an earlier daemon served.
    pub fn prepare_join(&self, all_inodes: impl Fn() -> Vec<u64>) {
        self.multi.store(true, Ordering::SeqCst);
        // Wait out replies that chose a long TTL before the switch; none of them blocks.
        while self.granting.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        // Attributes only: no page lock is taken, so this cannot wait on a request.
        self.drop_caches(all_inodes, false);
    }

    /// The volume's content was replaced underneath (rollback, restore): every present
    /// mount's kernel drops its names, attributes and pages. Not for request threads: a
    /// page invalidation waits for reads in flight.
    pub fn invalidate_all(&self, all_inodes: impl Fn() -> Vec<u64>) {
        self.drop_caches(all_inodes, true);
    }

    /// Has every present mount's kernel write back the pages it holds dirty for `inos`
    /// (shared writable mmaps): a page invalidation launders each dirty page with a WRITE
    /// and waits for it, which `syncfs` on a FUSE mount does not. Mounts an earlier daemon
    /// served (whose open files this one never counted) do it for `all_inodes`. Not for
    /// request threads: it waits for those WRITEs.
    pub fn write_back(&self, inos: &[u64], all_inodes: impl Fn() -> Vec<u64>) {
        let present: Vec<Arc<MountState>> = lock(&self.mounts).clone();
        for m in present {
            let Some(n) = m.notifier.get() else { continue };
            let list = if m.resumed {
                all_inodes()
            } else {
                inos.to_vec()
            };
            for ino in list {
                let _ = n.inval_inode(INodeNo(ino), 0, 0);
            }
        }
    }

    /// Every present mount's kernel drops its cached names and the attributes (and with
    /// `pages`, the page cache) of every inode it knows.
    fn drop_caches(&self, all_inodes: impl Fn() -> Vec<u64>, pages: bool) {
        let present: Vec<Arc<MountState>> = lock(&self.mounts).clone();
        for m in present {
            if let Err(e) = m.notify_raw(FUSE_NOTIFY_INC_EPOCH) {
                tracing::warn!("dropping cached names of a mount failed: {e}");
            }
            let Some(n) = m.notifier.get() else { continue };
            let mut inos = if m.resumed {
                all_inodes()
            } else {
                m.known_inodes()
            };
            inos.push(crate::store::ROOT_INO);
            for ino in inos {
                // Offset -1: attributes only.
                let _ = n.inval_inode(INodeNo(ino), if pages { 0 } else { -1 }, 0);
            }
        }
    }

    fn join(&self, m: Arc<MountState>) {
        let mut l = lock(&self.mounts);
        l.push(m);
        if l.len() > 1 {
            self.multi.store(true, Ordering::SeqCst);
        }
    }

    /// After a mount is gone (or failed to start).
    pub fn leave(&self, id: u64) {
        let mut l = lock(&self.mounts);
        l.retain(|m| m.id != id);
        if l.len() <= 1 {
            self.multi.store(false, Ordering::SeqCst);
        }
    }

    fn has_others(&self, me: u64) -> bool {
        lock(&self.mounts).iter().any(|m| m.id != me)
    }

    /// Has the other mounts drop cached pages of a range just written, and waits (a
    /// bounded time) until they did. The wait is bounded because each kernel may hold
    /// a page lock while waiting for this daemon (a partial-page write through two mounts
    /// at once); the notification is then delivered once that write is answered.
    fn drop_pages(&self, from: u64, ino: u64, offset: i64, len: i64) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let w = PageInval {
            from,
            ino,
            offset,
            len,
            done,
        };
        if lock(&self.queue).send(w).is_ok()
            && wait.recv_timeout(Duration::from_millis(500)).is_err()
        {
            tracing::debug!(ino, "page invalidation of other mounts still pending");
        }
    }
}

/// A live mount served by background threads.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    peers: Arc<Peers>,
    state: Arc<MountState>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Without a session handed to `unmount`'s waiter (which leaves when it ends).
        if self.session.is_some() {
            self.peers.leave(self.state.id);
        }
    }
}

impl Mounted {
    /// Unmounts (a busy mountpoint lazily); never waits for the session. The session ends
    /// once the kernel ends the connection, which waits for every other mount of it (a
    /// bind in a container's namespace, the open files of a detached mount). Until then
    /// it still serves, so it stays among the volume's peers.
    pub fn unmount(mut self, mountpoint: &Path) {
        if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            tracing::info!(
                "{} is busy ({e}); detaching it lazily",
                mountpoint.display()
            );
            detach(mountpoint);
        }
        if let Some(s) = self.session.take() {
            let path = mountpoint.to_path_buf();
            let peers = self.peers.clone();
            let id = self.state.id;
            let waiter = std::thread::Builder::new()
                .name("session-end".into())
                .spawn(move || {
                    if let Err(e) = s.join() {
                        tracing::debug!("session of {} ended: {e}", path.display());
                    }
                    peers.leave(id);
                });
            if let Err(e) = waiter {
                tracing::warn!("starting a thread to wait for a session's end: {e}");
                self.peers.leave(self.state.id);
            }
        }
    }

    /// The connection's descriptor (for the keeper).
    pub fn device(&self) -> BorrowedFd<'_> {
        self.state.dev.as_fd()
    }
}

/// Lazily detaches a mount; harmless if nothing is mounted there.
pub fn detach(mountpoint: &Path) {
    let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
}

/// True if the FUSE connection behind `dev` was aborted (its mount is gone).
pub fn connection_dead(dev: BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(dev, PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => true,
    }
}

fn session_config() -> Config {
    let mut config = Config::default();
    config.n_threads = Some(LOOPS);
    config.clone_fd = false;
    config
}

/// Mounts `fs` at the spec's mountpoint as type `fuse.volfs` and serves it from
/// background threads.
pub fn mount<F: FileSystem>(fs: Arc<F>, spec: &MountSpec<'_>) -> std::io::Result<Mounted> {
    use nix::mount::MsFlags;

    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening /dev/fuse: {e}")))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if spec.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    // allow_other: containers run as users other than the daemon's.
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        dev.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let source = format!("volfs:{}", spec.volume);
    nix::mount::mount(
        Some(source.as_str()),
        spec.mountpoint,
        Some("fuse.volfs"),
        flags,
        Some(data.as_str()),
    )
    .map_err(std::io::Error::from)?;
    let dev = OwnedFd::from(dev);
    let started = dev.try_clone().and_then(|keep| {
        let state = Arc::new(MountState::new(
            spec.peers.next.fetch_add(1, Ordering::Relaxed),
            keep,
            false,
        ));
        let session = fuser::Session::from_fd(
            adapter(fs, spec, state.clone()),
            dev,
            SessionACL::All,
            session_config(),
        )?;
        serve(session, spec, state)
    });
    started.inspect_err(|_| detach(spec.mountpoint))
}

/// Serves a connection an earlier daemon set up (and the keeper held on to). The kernel
/// finished FUSE_INIT with that daemon long ago, so fuser's handshake is fed a stand-in
/// INIT over a socket pair whose descriptor number is then pointed at the connection.
pub fn resume<F: FileSystem>(
    fs: Arc<F>,
    spec: &MountSpec<'_>,
    dev: OwnedFd,
) -> std::io::Result<Mounted> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nix::unistd::write(&ours, &stand_in_init())?;
    let theirs_raw = theirs.as_raw_fd();
    let state = Arc::new(MountState::new(
        spec.peers.next.fetch_add(1, Ordering::Relaxed),
        dev,
        true,
    ));
    let session = fuser::Session::from_fd(
        adapter(fs, spec, state.clone()),
        theirs,
        SessionACL::All,
        session_config(),
    )?;
    drop(ours);
    // The session now reads and writes descriptor `theirs_raw`: make it the connection.
    nix::unistd::dup3(
        state.dev.as_raw_fd(),
        theirs_raw,
        nix::fcntl::OFlag::O_CLOEXEC,
    )?;
    // Before any loop of ours reads: the kernel requeues exactly what the dead daemon read
    // and never answered. Sent later, it would also requeue requests this daemon is still
    // working on, and a first run finishing after the second (and after what the caller
    // did next) would undo it.
    if let Err(e) = state.notify_raw(FUSE_NOTIFY_RESEND) {
        tracing::warn!("asking the kernel to resend requests: {e}");
    }
    serve(session, spec, state)
}

/// fuse_in_header + fuse_init_in for protocol 7.40 offering every capability volfs asks for.
fn stand_in_init() -> Vec<u8> {
    const FUSE_INIT: u32 = 26;
    let mut b = Vec::with_capacity(104);
    b.extend_from_slice(&104u32.to_ne_bytes()); // len
    b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    b.extend_from_slice(&1u64.to_ne_bytes()); // unique
    b.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    b.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding
    b.extend_from_slice(&7u32.to_ne_bytes());
    b.extend_from_slice(&40u32.to_ne_bytes());
    b.extend_from_slice(&MAX_WRITE.to_ne_bytes()); // max_readahead
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // flags
    b.extend_from_slice(&0u32.to_ne_bytes()); // flags2
    b.extend_from_slice(&[0u8; 44]);
    b
}

fn adapter<F: FileSystem>(
    fs: Arc<F>,
    spec: &MountSpec<'_>,
    state: Arc<MountState>,
) -> FuseAdapter<F> {
    FuseAdapter {
        fs,
        read_only: spec.read_only,
        peers: spec.peers.clone(),
        me: state,
        gate: spec.gate.clone(),
    }
}

fn serve<F: FileSystem>(
    session: fuser::Session<FuseAdapter<F>>,
    spec: &MountSpec<'_>,
    state: Arc<MountState>,
) -> std::io::Result<Mounted> {
    let _ = state.notifier.set(session.notifier());
    spec.peers.join(state.clone());
    match session.spawn() {
        Ok(s) => Ok(Mounted {
            session: Some(s),
            peers: spec.peers.clone(),
            state,
        }),
        Err(e) => {
            spec.peers.leave(state.id);
            Err(e)
        }
    }
}

fn errno(e: &FsError) -> Errno {
    if !matches!(e, FsError::Io(_)) {
        tracing::debug!("answering {e}");
    }
    Errno::from_i32(e.errno())
}

fn ts(t: Timestamp) -> SystemTime {
    t.to_system()
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: ts(a.atime),
        mtime: ts(a.mtime),
        ctime: ts(a.ctime),
        crtime: ts(a.btime),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Set by the kernel on requests queued again by FUSE_NOTIFY_RESEND: an earlier daemon
/// read them and may have carried them out before it died without answering.
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

fn resent(req: &Request) -> bool {
    req.unique().0 & FUSE_UNIQUE_RESEND != 0
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(Timestamp::from_system(t)),
    }
}

fn empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: FsResult<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

impl<F: FileSystem> FuseAdapter<F> {
    /// After data changed in `offset..offset+len` of `ino` (`len` 0: to the end).
    fn pages_changed(&self, ino: u64, offset: u64, len: u64) {
        if self.peers.has_others(self.me.id) {
            let off = i64::try_from(offset).unwrap_or(i64::MAX);
            let len = i64::try_from(len).unwrap_or(0);
            self.peers.drop_pages(self.me.id, ino, off, len);
        }
    }

    fn has_peers(&self) -> bool {
        self.peers.has_others(self.me.id)
    }

    /// Replies with an entry; the kernel then holds one more lookup of it.
    fn entry(&self, reply: ReplyEntry, r: FsResult<Attr>) {
        match r {
            Ok(a) => {
                let ttl = self.peers.ttl();
                self.me.looked_up(a.ino);
                reply.entry(&ttl.ttl, &file_attr(&a), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn attr(&self, reply: ReplyAttr, r: FsResult<Attr>) {
        match r {
            Ok(a) => {
                let ttl = self.peers.ttl();
                reply.attr(&ttl.ttl, &file_attr(&a));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// A resent request that creates `name` finds it already there when the earlier
    /// daemon did the work: answer with what is there if it is of the kind asked for.
    fn created_before(
        &self,
        req: &Request,
        parent: u64,
        name: &[u8],
        r: FsResult<Attr>,
        kind: FileKind,
    ) -> FsResult<Attr> {
        match r {
            Err(FsError::Exists) if resent(req) => match self.fs.lookup(parent, name) {
                Ok(a) if a.kind == kind => {
                    tracing::info!(
                        parent,
                        "resent request: the earlier daemon already created it"
                    );
                    Ok(a)
                }
                _ => Err(FsError::Exists),
            },
            r => r,
        }
    }

    /// A resent request that removes something finds it gone when the earlier daemon did it.
    fn removed_before(req: &Request, r: FsResult<()>) -> FsResult<()> {
        match r {
            Err(FsError::NotFound) if resent(req) => Ok(()),
            r => r,
        }
    }

    fn writable(&self) -> FsResult<()> {
        if self.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl<F: FileSystem> Filesystem for FuseAdapter<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for cap in [
            // No writeback cache: with it the kernel trusts its own file size and mtime
            // over this daemon's, and other mounts of the volume could not see changes.
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_POSIX_ACL,
            // The filesystem applies the umask itself, after default ACLs (ACLs replace it).
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_ASYNC_READ,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::info!("kernel lacks FUSE capability {missing:?}");
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.sync() {
            tracing::error!("flushing the store at unmount: {e}");
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // Not gated: FORGET has no answer, so the kernel would never resend it.
        // With one mount, a forgotten inode is held by no kernel: an orphan can go.
        if self.me.forgot(ino.0, nlookup) && !self.has_peers() {
            if let Err(e) = self.fs.forget(ino.0) {
                tracing::warn!(ino = ino.0, "reclaiming a forgotten inode: {e}");
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _pass = self.gate.enter();
        self.entry(reply, self.fs.lookup(parent.0, name.as_bytes()));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _pass = self.gate.enter();
        self.attr(reply, self.fs.getattr(ino.0));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _pass = self.gate.enter();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(Timestamp::from_system),
        };
        let r = self
            .writable()
            .and_then(|()| self.fs.setattr(&ctx(req), ino.0, &set));
        if let (Ok(_), Some(size)) = (&r, size) {
            self.pages_changed(ino.0, size, 0);
        }
        self.attr(reply, r);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _pass = self.gate.enter();
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.enter();
        let r = self.writable().and_then(|()| {
            self.fs
                .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, rdev)
        });
        let r = match FileKind::from_mode(mode) {
            Some(k) => self.created_before(req, parent.0, name.as_bytes(), r, k),
            None => r,
        };
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.enter();
        let r = self.writable().and_then(|()| {
            self.fs
                .mkdir(&ctx(req), parent.0, name.as_bytes(), mode, umask)
        });
        let r = self.created_before(req, parent.0, name.as_bytes(), r, FileKind::Directory);
        self.entry(reply, r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.gate.enter();
        let r = self
            .writable()
            .and_then(|()| Self::removed_before(req, self.fs.unlink(parent.0, name.as_bytes())));
        empty(reply, r);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.gate.enter();
        let r = self
            .writable()
            .and_then(|()| Self::removed_before(req, self.fs.rmdir(parent.0, name.as_bytes())));
        empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.enter();
        let r = self.writable().and_then(|()| {
            self.fs.symlink(
                &ctx(req),
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            )
        });
        let r = self.created_before(req, parent.0, link_name.as_bytes(), r, FileKind::Symlink);
        self.entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        let known = fuser::RenameFlags::RENAME_NOREPLACE | fuser::RenameFlags::RENAME_EXCHANGE;
        let r = self.writable().and_then(|()| {
            if !known.contains(flags) {
                return Err(FsError::Invalid);
            }
            let f = RenameFlags {
                noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
            };
            let r = self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                f,
            );
            // Done by the earlier daemon if the source is gone and the target is there.
            match r {
                Err(FsError::NotFound)
                    if resent(req) && self.fs.lookup(newparent.0, newname.as_bytes()).is_ok() =>
                {
                    Ok(())
                }
                r => r,
            }
        });
        empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.enter();
        let r = self
            .writable()
            .and_then(|()| self.fs.link(ino.0, newparent.0, newname.as_bytes()));
        let r = match r {
            Err(FsError::Exists) if resent(req) => {
                match self.fs.lookup(newparent.0, newname.as_bytes()) {
                    Ok(a) if a.ino == ino.0 => Ok(a),
                    _ => Err(FsError::Exists),
                }
            }
            r => r,
        };
        self.entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.gate.enter();
        let wants_write =
            !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) || flags.0 & libc::O_TRUNC != 0;
        let r = if wants_write { self.writable() } else { Ok(()) };
        match r.and_then(|()| self.fs.open(ino.0)) {
            // Keep the page cache across opens: with one mount every change goes through
            // this kernel; with several, each read first checks mtime and size (see Peers).
            // No FLUSH on close: there is nothing to flush (no writeback cache) and locks
            // are the kernel's; a close then never waits for this daemon.
            Ok(_) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _pass = self.gate.enter();
        match self.fs.read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _pass = self.gate.enter();
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self
            .writable()
            .and_then(|()| self.fs.write(ino.0, offset, data, kill))
        {
            Ok(n) => {
                self.pages_changed(ino.0, offset, u64::from(n));
                reply.written(n)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        empty(reply, self.fs.release(ino.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        let r = self.fs.sync();
        if r.is_ok() {
            // With the writeback cache the kernel keeps its own attributes; have it fetch
            // st_blocks (now final) again. Attributes only: no lock the fsync holds.
            if let Some(n) = self.me.notifier.get() {
                let _ = n.inval_inode(ino, -1, 0);
            }
        }
        empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.gate.enter();
        match self.fs.open(ino.0) {
            Ok(a) if a.kind != FileKind::Directory => reply.error(Errno::ENOTDIR),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _pass = self.gate.enter();
        match self.fs.readdir(ino.0, offset, 1024) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _pass = self.gate.enter();
        match self.fs.readdir(ino.0, offset, 256) {
            Ok(entries) => {
                let ttl = self.peers.ttl();
                for e in entries {
                    // An entry removed since the listing began is simply left out.
                    let Ok(a) = self.fs.getattr(e.ino) else {
                        continue;
                    };
                    let name = OsStr::from_bytes(&e.name);
                    let full = reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        name,
                        &ttl.ttl,
                        &file_attr(&a),
                        Generation(0),
                    );
                    if full {
                        break;
                    }
                    // The kernel takes a lookup of every entry sent but "." and "..".
                    if e.name != b"." && e.name != b".." {
                        self.me.looked_up(e.ino);
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        empty(reply, self.fs.release(ino.0));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        empty(reply, self.fs.sync());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _pass = self.gate.enter();
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        let r = self.writable().and_then(|()| {
            self.fs
                .setxattr(&ctx(req), ino.0, name.as_bytes(), value, flags)
        });
        empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _pass = self.gate.enter();
        xattr_reply(reply, size, self.fs.getxattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _pass = self.gate.enter();
        xattr_reply(reply, size, self.fs.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.gate.enter();
        let r = self
            .writable()
            .and_then(|()| self.fs.removexattr(ino.0, name.as_bytes()));
        empty(reply, r);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _pass = self.gate.enter();
        let r = if mask.contains(AccessFlags::W_OK) {
            self.writable()
        } else {
            Ok(())
        };
        empty(reply, r.and_then(|()| self.fs.getattr(ino.0).map(|_| ())));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _pass = self.gate.enter();
        let r = self.writable().and_then(|()| {
            let mode = (mode & 0o7777) | libc::S_IFREG;
            let made = self
                .fs
                .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, 0);
            let a = if flags & libc::O_EXCL == 0 {
                self.created_before(req, parent.0, name.as_bytes(), made, FileKind::Regular)?
            } else {
                made?
            };
            self.fs.open(a.ino)
        });
        match r {
            Ok(a) => {
                let ttl = self.peers.ttl();
                self.me.looked_up(a.ino);
                reply.created(
                    &ttl.ttl,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(0),
                    OPEN_FLAGS,
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        let _pass = self.gate.enter();
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _pass = self.gate.enter();
        reply.error(Errno::ENOTTY);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        let _pass = self.gate.enter();
        // Regular files are always ready, as on a local filesystem.
        let ready = PollEvents::POLLIN
            | PollEvents::POLLOUT
            | PollEvents::POLLRDNORM
            | PollEvents::POLLWRNORM;
        reply.poll(events & ready);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.enter();
        let r = self
            .writable()
            .and_then(|()| self.fs.fallocate(ino.0, offset, length, mode));
        if r.is_ok() {
            self.pages_changed(ino.0, offset, length);
        }
        empty(reply, r);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _pass = self.gate.enter();
        let r = match (u64::try_from(offset), whence) {
            (Ok(off), libc::SEEK_DATA | libc::SEEK_HOLE) => self.fs.lseek(ino.0, off, whence),
            (Err(_), libc::SEEK_DATA | libc::SEEK_HOLE) => Err(FsError::NoSeekData),
            _ => Err(FsError::Invalid),
        };
        match r {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _pass = self.gate.enter();
        // The kernel falls back to copying through the page cache.
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }
}
