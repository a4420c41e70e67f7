//! The FUSE adapter: the only module that knows fuser's types.
//!
//! Each mount gets one [`FuseAdapter`] over the volume's shared [`FileSystem`]; it converts
//! requests into calls of the seam, results into replies (one place maps errors to errnos),
//! and enforces the mount's read-only flag itself, so EROFS holds even for root and even if
//! the kernel's own `ro` flag were bypassed.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
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

/// How long the kernel may cache entries and attributes. Every change to a volume goes
/// through a mount on this host: that mount's kernel cache follows it by itself, and the
/// volume's other mounts are told to drop what it changed ([`Peers`]) before the change is
/// acknowledged. The TTL is only a backstop.
const TTL: Duration = Duration::from_secs(60);
/// FUSE event loops per mount, each with its own cloned `/dev/fuse` descriptor.
const LOOPS: usize = 4;
const MAX_WRITE: u32 = 1024 * 1024;

/// One mount of a volume.
pub struct FuseAdapter<F: FileSystem> {
    fs: Arc<F>,
    read_only: bool,
    notifier: Arc<OnceLock<Notifier>>,
    peers: Arc<Peers>,
    /// This mount's id among `peers`, set once it serves.
    me: Arc<OnceLock<u64>>,
}

/// Mount-time settings of one mount.
pub struct MountSpec<'a> {
    pub volume: &'a str,
    pub mountpoint: &'a Path,
    pub read_only: bool,
    /// The other mounts of the same volume.
    pub peers: Arc<Peers>,
}

/// The live mounts of one volume. A change made through one mount is followed by
/// invalidations of what the others' kernels cache of it (attributes, page ranges,
/// names), sent from a thread of its own: sending from the handler, before or after its
/// reply, can deadlock, since each kernel holds directory locks while it waits for this
/// daemon, and two mounts invalidating each other would wait on each other.
pub struct Peers {
    next: std::sync::atomic::AtomicU64,
    mounts: Arc<std::sync::Mutex<Vec<(u64, Notifier)>>>,
    queue: std::sync::Mutex<std::sync::mpsc::Sender<(u64, Vec<Inval>)>>,
}

impl Default for Peers {
    fn default() -> Peers {
        let mounts: Arc<std::sync::Mutex<Vec<(u64, Notifier)>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<Inval>)>();
        let list = mounts.clone();
        // Ends when the volume's Peers is dropped (the channel closes).
        let _ = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for (from, what) in rx {
                    let others: Vec<Notifier> = lock_list(&list)
                        .iter()
                        .filter(|(i, _)| *i != from)
                        .map(|(_, n)| n.clone())
                        .collect();
                    for n in others {
                        for w in &what {
                            // ENOENT: that kernel does not cache it; nothing to forget.
                            let _ = match w {
                                Inval::Inode(ino, off, len) => {
                                    n.inval_inode(INodeNo(*ino), *off, *len)
                                }
                                Inval::Entry(parent, name) => {
                                    n.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                                }
                            };
                        }
                    }
                }
            });
        Peers {
            next: std::sync::atomic::AtomicU64::new(0),
            mounts,
            queue: std::sync::Mutex::new(tx),
        }
    }
}

fn lock_list(
    m: &std::sync::Mutex<Vec<(u64, Notifier)>>,
) -> std::sync::MutexGuard<'_, Vec<(u64, Notifier)>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peers {
    fn join(&self, n: Notifier) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock_list(&self.mounts).push((id, n));
        id
    }

    fn leave(&self, id: u64) {
        lock_list(&self.mounts).retain(|(i, _)| *i != id);
    }

    fn has_others(&self, me: u64) -> bool {
        lock_list(&self.mounts).iter().any(|(i, _)| *i != me)
    }

    fn send(&self, from: u64, what: Vec<Inval>) {
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let _ = q.send((from, what));
    }
}

/// What another mount's kernel must forget.
enum Inval {
    /// Attributes, and the page range `offset..offset+len` unless `offset` is negative
    /// (`len` 0: to the end).
    Inode(u64, i64, i64),
    Entry(u64, Vec<u8>),
}

/// A live mount served by background threads.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    peers: Arc<Peers>,
    id: u64,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.peers.leave(self.id);
    }
}

impl Mounted {
    /// Unmounts and waits for the session's threads; a busy mountpoint is detached lazily
    /// instead (its last user's close ends the session), so the daemon never blocks on it.
    pub fn unmount(mut self, mountpoint: &Path) {
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) => {
                if let Some(s) = self.session.take() {
                    if let Err(e) = s.join() {
                        tracing::debug!("session of {} ended: {e}", mountpoint.display());
                    }
                }
            }
            Err(e) => {
                tracing::info!(
                    "{} is busy ({e}); detaching it lazily",
                    mountpoint.display()
                );
                detach(mountpoint);
            }
        }
    }
}

/// Lazily detaches a mount; harmless if nothing is mounted there.
pub fn detach(mountpoint: &Path) {
    let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
}

/// Mounts `fs` at the spec's mountpoint as type `fuse.volfs` and serves it from
/// background threads.
pub fn mount<F: FileSystem>(fs: Arc<F>, spec: &MountSpec<'_>) -> std::io::Result<Mounted> {
    use nix::mount::MsFlags;
    use std::os::fd::{AsRawFd, OwnedFd};

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
    let mut config = Config::default();
    config.n_threads = Some(LOOPS);
    config.clone_fd = true;
    let notifier = Arc::new(OnceLock::new());
    let me = Arc::new(OnceLock::new());
    let adapter = FuseAdapter {
        fs,
        read_only: spec.read_only,
        notifier: notifier.clone(),
        peers: spec.peers.clone(),
        me: me.clone(),
    };
    let started = fuser::Session::from_fd(adapter, OwnedFd::from(dev), SessionACL::All, config)
        .and_then(|session| {
            let n = session.notifier();
            let _ = notifier.set(n.clone());
            let id = spec.peers.join(n);
            let _ = me.set(id);
            session
                .spawn()
                .map(|s| (s, id))
                .inspect_err(|_| spec.peers.leave(id))
        });
    match started {
        Ok((session, id)) => Ok(Mounted {
            session: Some(session),
            peers: spec.peers.clone(),
            id,
        }),
        Err(e) => {
            detach(spec.mountpoint);
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

fn entry(reply: ReplyEntry, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
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
    /// Makes the volume's other mounts forget what a change made stale (asynchronously,
    /// see [`Peers`]).
    fn tell_others(&self, what: Vec<Inval>) {
        if let Some(me) = self.me.get() {
            if self.peers.has_others(*me) {
                self.peers.send(*me, what);
            }
        }
    }

    fn has_peers(&self) -> bool {
        self.me.get().is_some_and(|me| self.peers.has_others(*me))
    }

    /// After a new name: the parent's attributes (mtime, nlink) changed.
    fn told_new_entry(&self, parent: u64, r: FsResult<Attr>) -> FsResult<Attr> {
        if let Ok(a) = &r {
            self.tell_others(vec![
                Inval::Inode(parent, -1, 0),
                Inval::Inode(a.ino, -1, 0),
            ]);
        }
        r
    }

    /// The inode a name points at now, when other mounts must hear about it.
    fn peer_child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        if self.has_peers() {
            self.fs.lookup(parent, name).ok().map(|a| a.ino)
        } else {
            None
        }
    }

    /// After a name went away (or was replaced): the name, the parent's attributes, and
    /// the attributes (nlink) of the inode it named.
    fn told_removed(&self, parent: u64, name: &[u8], child: Option<u64>) {
        let mut what = vec![
            Inval::Entry(parent, name.to_vec()),
            Inval::Inode(parent, -1, 0),
        ];
        what.extend(child.map(|c| Inval::Inode(c, -1, 0)));
        self.tell_others(what);
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
            InitFlags::FUSE_WRITEBACK_CACHE,
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

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.fs.lookup(parent.0, name.as_bytes()));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
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
        if r.is_ok() {
            let off = if size.is_some() { 0 } else { -1 };
            self.tell_others(vec![Inval::Inode(ino.0, off, 0)]);
        }
        match r {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
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
        let r = self.writable().and_then(|()| {
            self.fs
                .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, rdev)
        });
        entry(reply, self.told_new_entry(parent.0, r));
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
        let r = self.writable().and_then(|()| {
            self.fs
                .mkdir(&ctx(req), parent.0, name.as_bytes(), mode, umask)
        });
        entry(reply, self.told_new_entry(parent.0, r));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let child = self.peer_child(parent.0, name.as_bytes());
        let r = self
            .writable()
            .and_then(|()| self.fs.unlink(parent.0, name.as_bytes()));
        if r.is_ok() {
            self.told_removed(parent.0, name.as_bytes(), child);
        }
        empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let child = self.peer_child(parent.0, name.as_bytes());
        let r = self
            .writable()
            .and_then(|()| self.fs.rmdir(parent.0, name.as_bytes()));
        if r.is_ok() {
            self.told_removed(parent.0, name.as_bytes(), child);
        }
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
        let r = self.writable().and_then(|()| {
            self.fs.symlink(
                &ctx(req),
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            )
        });
        entry(reply, self.told_new_entry(parent.0, r));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let known = fuser::RenameFlags::RENAME_NOREPLACE | fuser::RenameFlags::RENAME_EXCHANGE;
        let replaced = self.peer_child(newparent.0, newname.as_bytes());
        let r = self.writable().and_then(|()| {
            if !known.contains(flags) {
                return Err(FsError::Invalid);
            }
            let f = RenameFlags {
                noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
            };
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                f,
            )
        });
        if r.is_ok() {
            self.told_removed(parent.0, name.as_bytes(), None);
            self.told_removed(newparent.0, newname.as_bytes(), replaced);
        }
        empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self
            .writable()
            .and_then(|()| self.fs.link(ino.0, newparent.0, newname.as_bytes()));
        entry(reply, self.told_new_entry(newparent.0, r));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let wants_write =
            !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) || flags.0 & libc::O_TRUNC != 0;
        let r = if wants_write { self.writable() } else { Ok(()) };
        match r.and_then(|()| self.fs.open(ino.0)) {
            // Keep the page cache across opens: every change reaches the volume through
            // this kernel, which keeps the cache up to date itself.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
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
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self
            .writable()
            .and_then(|()| self.fs.write(ino.0, offset, data, kill))
        {
            Ok(n) => {
                self.tell_others(vec![Inval::Inode(ino.0, offset as i64, i64::from(n))]);
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
        let r = self.fs.sync();
        if r.is_ok() {
            // With the writeback cache the kernel keeps its own attributes; have it fetch
            // st_blocks (now final) again. Attributes only: no lock the fsync holds.
            if let Some(n) = self.notifier.get() {
                let _ = n.inval_inode(ino, -1, 0);
            }
        }
        empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
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
        match self.fs.readdir(ino.0, offset, 256) {
            Ok(entries) => {
                for e in entries {
                    // An entry removed since the listing began is simply left out.
                    let Ok(a) = self.fs.getattr(e.ino) else {
                        continue;
                    };
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        name,
                        &TTL,
                        &file_attr(&a),
                        Generation(0),
                    ) {
                        break;
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
        empty(reply, self.fs.sync());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
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
        let r = self.writable().and_then(|()| {
            self.fs
                .setxattr(&ctx(req), ino.0, name.as_bytes(), value, flags)
        });
        if r.is_ok() {
            self.tell_others(vec![Inval::Inode(ino.0, -1, 0)]);
        }
        empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, self.fs.getxattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, self.fs.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .writable()
            .and_then(|()| self.fs.removexattr(ino.0, name.as_bytes()));
        if r.is_ok() {
            self.tell_others(vec![Inval::Inode(ino.0, -1, 0)]);
        }
        empty(reply, r);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
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
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.writable().and_then(|()| {
            let mode = (mode & 0o7777) | libc::S_IFREG;
            let a = self
                .fs
                .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, 0)?;
            self.fs.open(a.ino)
        });
        let r = self.told_new_entry(parent.0, r);
        match r {
            Ok(a) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
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
        let r = self
            .writable()
            .and_then(|()| self.fs.fallocate(ino.0, offset, length, mode));
        if r.is_ok() {
            self.tell_others(vec![Inval::Inode(ino.0, offset as i64, length as i64)]);
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
        // The kernel falls back to copying through the page cache.
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }
}
