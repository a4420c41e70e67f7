//! `volfs`: the command-line client of `volfs-mountd`, in the style of `docker volume`.
//!
//! Every command exits 0 on success and 1 on any failure, with `volfs: what failed` on
//! stderr. Commands taking several names (`inspect`, `rm`) handle each one, report each
//! failure, and exit 1 if any failed, as Docker does: `inspect a missing` prints the array
//! with `a` and reports `no such volume: missing`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use volfs::api::{self, LsFilters, Reply, Request, Response, VolumeInfo};
use volfs::units::{human_duration, human_size, rfc3339};
use volfs::volume::key_values;

/// Manage volfs volumes served by volfs-mountd.
#[derive(Parser, Debug)]
#[command(name = "volfs", version)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, env = "VOLFS_SOCKET", default_value = api::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a volume and print its name. Without a name, an anonymous volume with a
    /// random name. Creating an existing volume with the same labels and options is a no-op.
    Create {
        name: Option<String>,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// An option KEY=VALUE (repeatable): readonly=true|false, size=10G, uid=N, gid=N,
        /// mode=0755, from=/ABSOLUTE/PATH (a directory or tar file to copy in).
        #[arg(long = "opt", short = 'o', value_name = "KEY=VALUE")]
        opts: Vec<String>,
    },
    /// List volumes and where they are mounted.
    Ls {
        /// label=KEY, label=KEY=VALUE, dangling=true|false, name=SUBSTRING (repeatable; all
        /// must match).
        #[arg(long = "filter", short = 'f', value_name = "FILTER")]
        filters: Vec<String>,
        /// table, or json: one object per line, with the fields of `inspect` (Usage null).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Names only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Show volumes in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes and delete their data.
    Rm {
        /// Unmount a mounted volume first (otherwise it is refused).
        #[arg(long, short = 'f')]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove unmounted anonymous volumes (with --all, every unmounted volume).
    Prune {
        #[arg(long, short = 'a')]
        all: bool,
    },
    /// Show how much each volume holds.
    Df {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Mount a volume at an existing directory.
    Mount {
        name: String,
        path: PathBuf,
        /// Refuse every modification through this mount (EROFS, even for root).
        #[arg(long)]
        read_only: bool,
    },
    /// Unmount a volfs mountpoint.
    Umount { path: PathBuf },
    /// Take, list and remove snapshots: a volume's whole content at one instant.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Make a volume hold again what one of its snapshots holds (all snapshots stay).
    Rollback {
        /// VOL@SNAP
        target: String,
        /// Even while the volume is mounted writable: programs using it see its content
        /// change under them.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Create a new volume holding what a snapshot holds.
    Clone {
        /// VOL@SNAP
        target: String,
        new: String,
    },
    /// Fill a volume from a tar archive (plain, gzip or zstd), all or nothing: a missing
    /// volume is created; an existing one must be empty unless --replace. Entries that are
    /// absolute, leave the volume (..), pass through a symlink, repeat an earlier entry,
    /// hard-link outside the archive, or a truncated or corrupt archive are refused, naming
    /// the entry, and nothing is imported.
    Import {
        name: String,
        /// The archive; `-` reads standard input (not a terminal).
        #[arg(value_name = "FILE|-", default_value = "-")]
        file: PathBuf,
        /// Swap the content of a non-empty volume for the archive's.
        #[arg(long)]
        replace: bool,
    },
    /// Check a volume's store against every invariant (links, counts, directory index,
    /// reachability, chunks within the size and their checksums, snapshots, quota
    /// accounting); print each problem. Exits 1 when problems remain.
    Fsck {
        /// The volume (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every volume, and the store as a whole.
        #[arg(long)]
        all: bool,
        /// Fix what is safely fixable (orphans, counts, the directory index, stray keys,
        /// chunks past the size) and say what could not be; refused while mounted.
        #[arg(long)]
        repair: bool,
    },
    /// Read and verify every chunk of the volumes (default: all), live and in snapshots,
    /// while they stay in use. Exits 1 if any chunk is corrupt.
    Scrub { names: Vec<String> },
    /// Unmount everything and stop volfs-mountd (the next start mounts them again).
    Shutdown,
    /// Show the versions of this client and of the daemon.
    Version,
    /// Show the daemon's state: store, volumes, mounts, uptime.
    Info {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Write a volume out as a tar archive (POSIX pax, as GNU tar and bsdtar read it), to
    /// stdout or FILE. `volfs create NAME -o from=FILE` makes a volume of it again.
    Export {
        /// The volume, or VOL@SNAPSHOT for one of its snapshots.
        #[arg(value_name = "VOL[@SNAP]")]
        volume: String,
        /// Write to FILE (created or truncated; removed if the export fails).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        /// Compress the archive.
        #[arg(long, value_enum)]
        compress: Option<Compress>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Compress {
    Zstd,
    Gzip,
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a snapshot of a volume and print its name (default: the UTC time,
    /// YYYYMMDD-HHMMSS). Copies nothing: writers wait only while it is recorded.
    Create {
        volume: String,
        name: Option<String>,
    },
    /// List the snapshots of a volume, oldest first.
    Ls {
        volume: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove snapshots (VOL@SNAP) and free the space only they hold.
    Rm {
        #[arg(required = true)]
        targets: Vec<String>,
    },
}

/// Runs `f` on every item, printing what each success returns and each failure on
/// stderr; fails (exit 1) if any did.
fn each(
    items: Vec<String>,
    mut f: impl FnMut(String) -> Result<String, String>,
) -> Result<(), String> {
    let mut failed = false;
    for item in items {
        match f(item) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("volfs: {e}");
                failed = true;
            }
        }
    }
    if failed { Err(String::new()) } else { Ok(()) }
}

/// `VOL@SNAP` split in two, or an error saying what is expected.
fn snapshot_target(target: &str) -> Result<(String, String), String> {
    match target.split_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((v.to_string(), s.to_string())),
        _ => Err(format!(
            "{target:?} does not name a snapshot: write VOLUME@SNAPSHOT (see `volfs snapshot ls VOLUME`)"
        )),
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Refused input exits 1 like every other failure (clap's own code is 2);
            // --help and --version exit 0.
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 1 } else { 0 });
        }
    };
    if let Err(e) = run(cli) {
        if !e.is_empty() {
            eprintln!("volfs: {e}");
        }
        std::process::exit(1);
    }
}

fn absolute(path: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Sends `req` and returns the reply of a successful answer.
fn ask(socket: &std::path::Path, req: &Request) -> Result<Option<Reply>, String> {
    let Response { ok, error, reply } = api::call(socket, req)?;
    if !ok {
        return Err(error.unwrap_or_else(|| "request failed".into()));
    }
    Ok(reply)
}

fn unexpected(reply: Option<Reply>) -> String {
    format!("unexpected answer from volfs-mountd: {reply:?}")
}

fn run(cli: Cli) -> Result<(), String> {
    let socket = cli.socket.as_path();
    match cli.cmd {
        Cmd::Create { name, labels, opts } => {
            let req = Request::Create {
                name,
                labels: key_values(&labels, "label")?,
                options: key_values(&opts, "option")?,
            };
            match ask(socket, &req)? {
                Some(Reply::Volume(v)) => println!("{}", v.name),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Ls {
            filters,
            format,
            quiet,
        } => {
            let filters = LsFilters::parse(&filters)?;
            let vols = match ask(socket, &Request::Ls { filters })? {
                Some(Reply::Volumes(v)) => v,
                other => return Err(unexpected(other)),
            };
            print_ls(&vols, format, quiet)?;
        }
        Cmd::Inspect { names } => {
            let mut found = Vec::new();
            let mut failed = false;
            for name in names {
                match ask(socket, &Request::Inspect { name }) {
                    Ok(Some(Reply::Volume(v))) => found.push(v),
                    Ok(other) => return Err(unexpected(other)),
                    Err(e) => {
                        eprintln!("volfs: {e}");
                        failed = true;
                    }
                }
            }
            let docker: Vec<DockerVolume<'_>> = found.iter().map(docker_volume).collect();
            println!("{}", to_json(&docker, true)?);
            if failed {
                return Err(String::new());
            }
        }
        Cmd::Rm { force, names } => each(names, |name| {
            match ask(socket, &Request::Rm { name, force })? {
                Some(Reply::Removed(r)) => Ok(r.name),
                other => Err(unexpected(other)),
            }
        })?,
        Cmd::Prune { all } => match ask(socket, &Request::Prune { all })? {
            Some(Reply::Pruned(p)) => {
                if !p.deleted.is_empty() {
                    println!("Deleted Volumes:");
                    for n in &p.deleted {
                        println!("{n}");
                    }
                    println!();
                }
                println!("Total reclaimed space: {}", human_size(p.bytes));
            }
            other => return Err(unexpected(other)),
        },
        Cmd::Df { format } => {
            let vols = match ask(socket, &Request::Df)? {
                Some(Reply::Volumes(v)) => v,
                other => return Err(unexpected(other)),
            };
            print_df(&vols, format)?;
        }
        Cmd::Mount {
            name,
            path,
            read_only,
        } => {
            let req = Request::Mount {
                name,
                path: absolute(path)?,
                read_only,
            };
            ask(socket, &req)?;
        }
        Cmd::Umount { path } => {
            ask(
                socket,
                &Request::Umount {
                    path: absolute(path)?,
                },
            )?;
        }
        Cmd::Import {
            name,
            file,
            replace,
        } => import(socket, name, &file, replace)?,
        Cmd::Shutdown => {
            ask(socket, &Request::Shutdown)?;
        }
        Cmd::Fsck { name, all, repair } => {
            let name = if all { None } else { name };
            let report = match ask(socket, &Request::Fsck { name, repair })? {
                Some(Reply::Fsck(r)) => r,
                other => return Err(unexpected(other)),
            };
            print_fsck(&report)?;
        }
        Cmd::Scrub { names } => scrub(socket, names)?,
        Cmd::Snapshot(SnapshotCmd::Create { volume, name }) => {
            let req = Request::SnapshotCreate {
                name: volume,
                snapshot: name,
            };
            match ask(socket, &req)? {
                Some(Reply::Snapshot(s)) => println!("{}@{}", s.volume, s.name),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Snapshot(SnapshotCmd::Ls { volume, format }) => {
            let list = match ask(socket, &Request::SnapshotLs { name: volume })? {
                Some(Reply::Snapshots(l)) => l,
                other => return Err(unexpected(other)),
            };
            if format == Format::Json {
                for s in &list {
                    println!("{}", to_json(s, false)?);
                }
            } else {
                let width = list.iter().map(|s| s.name.len()).max().unwrap_or(0).max(8);
                println!(
                    "{:width$}  {:20}  {:>10}  {:>8}",
                    "SNAPSHOT", "CREATED", "SIZE", "INODES"
                );
                for s in &list {
                    println!(
                        "{:width$}  {:20}  {:>10}  {:>8}",
                        s.name,
                        rfc3339(s.created),
                        human_size(s.bytes),
                        s.inodes
                    );
                }
            }
        }
        Cmd::Snapshot(SnapshotCmd::Rm { targets }) => each(targets, |t| {
            let (name, snapshot) = snapshot_target(&t)?;
            match ask(socket, &Request::SnapshotRm { name, snapshot })? {
                Some(Reply::Snapshot(s)) => Ok(format!("{}@{}", s.volume, s.name)),
                other => Err(unexpected(other)),
            }
        })?,
        Cmd::Rollback { target, force } => {
            let (name, snapshot) = snapshot_target(&target)?;
            let req = Request::Rollback {
                name,
                snapshot,
                force,
            };
            match ask(socket, &req)? {
                Some(Reply::RolledBack(r)) => println!(
                    "rolled {} back to {}@{} ({} copied back)",
                    r.volume,
                    r.volume,
                    r.snapshot,
                    human_size(r.copied_bytes)
                ),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Clone { target, new } => {
            let (name, snapshot) = snapshot_target(&target)?;
            let req = Request::CloneVolume {
                name,
                snapshot,
                new,
            };
            match ask(socket, &req)? {
                Some(Reply::Volume(v)) => println!("{}", v.name),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Version => {
            println!("Client version:  {}", env!("CARGO_PKG_VERSION"));
            match ask(socket, &Request::Version)? {
                Some(Reply::Version(v)) => {
                    println!("Daemon version:  {} (protocol {})", v.version, v.protocol)
                }
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Info { format } => match ask(socket, &Request::Info)? {
            Some(Reply::Info(i)) => {
                if format == Format::Json {
                    println!("{}", to_json(&i, false)?);
                } else {
                    println!("Version:       {}", i.version);
                    println!("Daemon pid:    {}", i.pid);
                    println!("Uptime:        {}", human_duration(i.uptime_secs));
                    println!("Store:         {}", i.root.display());
                    println!(
                        "Store size:    {} ({} bytes)",
                        human_size(i.store_bytes),
                        i.store_bytes
                    );
                    println!("Volumes:       {}", i.volumes);
                    println!("Mounts:        {}", i.mounts);
                }
            }
            other => return Err(unexpected(other)),
        },
        Cmd::Export {
            volume,
            output,
            compress,
        } => export(socket, &volume, output, compress)?,
    }
    Ok(())
}

/// Where an export goes.
enum Output {
    File(std::fs::File),
    Stdout(std::io::Stdout),
}

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::File(f) => f.write(b),
            Output::Stdout(s) => s.write(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.flush(),
            Output::Stdout(s) => s.flush(),
        }
    }
}

/// The archive on its way out, compressed or not.
enum Encoder<W: Write> {
    Plain(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    fn new(out: W, compress: Option<Compress>) -> std::io::Result<Encoder<W>> {
        Ok(match compress {
            None => Encoder::Plain(out),
            Some(Compress::Zstd) => Encoder::Zstd(zstd::stream::write::Encoder::new(out, 3)?),
            // No name and a zero mtime in the gzip header: the same archive compresses to the
            // same bytes.
            Some(Compress::Gzip) => Encoder::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
        })
    }

    fn finish(self) -> std::io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Zstd(z) => z.finish(),
            Encoder::Gzip(g) => g.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(b),
            Encoder::Zstd(z) => z.write(b),
            Encoder::Gzip(g) => g.write(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::Gzip(g) => g.flush(),
        }
    }
}

/// A progress line on stderr, redrawn at most five times a second.
struct Progress {
    what: String,
    t0: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn show(&mut self, bytes: u64, done: bool) {
        let now = Instant::now();
        if !done
            && self
                .last
                .is_some_and(|l| now - l < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        let secs = self.t0.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            format!(", {}/s", human_size((bytes as f64 / secs) as u64))
        } else {
            String::new()
        };
        let verb = if done { "exported" } else { "exporting" };
        eprint!(
            "\r\x1b[K{verb} {}: {}{rate}{}",
            self.what,
            human_size(bytes),
            if done { "\n" } else { "" }
        );
    }
}

/// `volfs export VOL[@SNAP] [-o FILE] [--compress zstd|gzip]`.
fn export(
    socket: &std::path::Path,
    volume: &str,
    output: Option<PathBuf>,
    compress: Option<Compress>,
) -> Result<(), String> {
    let (name, snapshot) = match volume.split_once('@') {
        Some((n, s)) => (n.to_string(), Some(s.to_string())),
        None => (volume.to_string(), None),
    };
    if output.is_none() && std::io::stdout().is_terminal() {
        return Err(format!(
            "refusing to write a tar archive to a terminal: give -o FILE or redirect stdout \
             (volfs export {volume} > {name}.tar)"
        ));
    }
    // The file is opened before the daemon is asked, so that a path that cannot be written
    // fails first, but only truncated once the daemon has accepted.
    let opened = match &output {
        Some(p) => Some(open_output(p)?),
        None => None,
    };
    let started = api::start_export(socket, &Request::Export { name, snapshot });
    let stream = match started {
        Ok(s) => s,
        Err(e) => {
            if let (Some(p), Some((_, true))) = (&output, &opened) {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    let (out, remove_on_failure) = match (opened, &output) {
        (Some((f, _)), Some(p)) => {
            // Only a regular file is truncated and removed on failure (not /dev/null, a
            // FIFO…).
            let regular = f.metadata().is_ok_and(|m| m.is_file());
            if regular {
                f.set_len(0)
                    .map_err(|e| format!("cannot truncate {}: {e}", p.display()))?;
            }
            (Output::File(f), regular.then(|| p.clone()))
        }
        _ => (Output::Stdout(std::io::stdout()), None),
    };
    let result = copy_export(stream, out, compress, volume);
    if let (Err(_), Some(p)) = (&result, &remove_on_failure) {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// Opens `path` for writing without truncating it; true if this created it.
fn open_output(path: &std::path::Path) -> Result<(std::fs::File, bool), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(|f| (f, false))
            .map_err(fail),
        Err(e) => Err(fail(e)),
    }
}

fn copy_export(
    stream: api::ExportStream,
    out: Output,
    compress: Option<Compress>,
    volume: &str,
) -> Result<(), String> {
    let writing = |e: std::io::Error| format!("writing the archive: {e}");
    let mut enc =
        Encoder::new(std::io::BufWriter::with_capacity(1 << 20, out), compress).map_err(writing)?;
    let mut progress = std::io::stderr().is_terminal().then(|| Progress {
        what: volume.to_string(),
        t0: Instant::now(),
        last: None,
    });
    let copied = stream.copy_to(&mut enc, &mut |n| {
        if let Some(p) = progress.as_mut() {
            p.show(n, false);
        }
    });
    let total = match copied {
        Ok(n) => n,
        Err(e) => {
            if progress.is_some() {
                eprintln!();
            }
            return Err(e.to_string());
        }
    };
    let out = enc
        .finish()
        .map_err(writing)?
        .into_inner()
        .map_err(|e| writing(e.into_error()))?;
    match out {
        Output::File(f) => {
            // A backup is only made once it is on disk; a FIFO or device cannot be synced.
            if f.metadata().is_ok_and(|m| m.is_file()) {
                f.sync_all().map_err(writing)?;
            }
        }
        Output::Stdout(mut s) => s.flush().map_err(writing)?,
    }
    if let Some(p) = progress.as_mut() {
        p.show(total, true);
    }
    Ok(())
}

/// `volfs import`: streams the archive to the daemon and prints what it imported.
fn import(
    socket: &std::path::Path,
    name: String,
    file: &std::path::Path,
    replace: bool,
) -> Result<(), String> {
    use std::io::IsTerminal;
    let mut source: Box<dyn std::io::Read> = if file == std::path::Path::new("-") {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            return Err(
                "refusing to read an archive from a terminal: give a FILE, or pipe one in \
                 (`volfs import VOL - < data.tar`)"
                    .into(),
            );
        }
        Box::new(stdin.lock())
    } else {
        let f = std::fs::File::open(file)
            .map_err(|e| format!("cannot open the archive {}: {e}", file.display()))?;
        if f.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(format!(
                "{} is a directory: import takes a tar archive (to copy a directory, use \
                 `volfs create {name} --opt from={}`)",
                file.display(),
                file.display()
            ));
        }
        Box::new(f)
    };
    let req = Request::Import {
        name: name.clone(),
        replace,
    };
    let Response { ok, error, reply } = api::call_streaming(socket, &req, &mut source)?;
    if !ok {
        return Err(error.unwrap_or_else(|| "import failed".into()));
    }
    match reply {
        Some(Reply::Imported(i)) => {
            let s = &i.stats;
            let plural =
                |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
            println!(
                "imported {}, {}, {}, {}, {} ({}) into {}{}",
                plural(s.files, "file", "files"),
                plural(s.dirs, "dir", "dirs"),
                plural(s.symlinks, "symlink", "symlinks"),
                plural(s.hardlinks, "hard link", "hard links"),
                plural(s.others, "other", "others"),
                human_size(s.bytes),
                i.volume.name,
                if i.created { " (created)" } else { "" }
            );
            if let Some(k) = &i.kept_snapshot {
                println!(
                    "the previous content is snapshot {}@{k} (undo with `volfs rollback {}@{k}`)",
                    i.volume.name, i.volume.name
                );
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// Prints what `fsck` found; an error when problems remain.
fn print_fsck(r: &api::FsckReport) -> Result<(), String> {
    for n in &r.notes {
        println!("note: {n}");
    }
    for v in &r.volumes {
        for f in &v.repaired {
            println!("{}: repaired: {f}", v.name);
        }
        for p in &v.problems {
            println!("{p}");
        }
        let counts = format!(
            "{} inodes, {} entries, {} chunks ({}) verified",
            v.inodes,
            v.entries,
            v.chunks,
            human_size(v.bytes)
        );
        if v.problems.is_empty() {
            println!("{}: clean ({counts})", v.name);
        } else {
            println!("{}: {} problem(s) ({counts})", v.name, v.problems.len());
        }
    }
    for p in &r.store {
        println!("{p}");
    }
    let bad: usize = r.volumes.iter().map(|v| v.problems.len()).sum::<usize>() + r.store.len();
    if bad > 0 {
        let repair = if r.volumes.iter().any(|v| !v.repaired.is_empty()) {
            "left after the repair"
        } else {
            "found (`volfs fsck --repair VOL` fixes the safe ones; unmount the volume first)"
        };
        return Err(format!("{bad} problem(s) {repair}"));
    }
    Ok(())
}

/// `volfs scrub`: one request per volume, so a terminal can show the progress.
fn scrub(socket: &std::path::Path, names: Vec<String>) -> Result<(), String> {
    use std::io::{IsTerminal, Write};
    let names = if names.is_empty() {
        match ask(
            socket,
            &Request::Ls {
                filters: LsFilters::default(),
            },
        )? {
            Some(Reply::Volumes(v)) => v.into_iter().map(|v| v.name).collect(),
            other => return Err(unexpected(other)),
        }
    } else {
        names
    };
    let tty = std::io::stderr().is_terminal();
    let t = std::time::Instant::now();
    let (mut chunks, mut bytes, mut bad) = (0u64, 0u64, 0usize);
    for (i, name) in names.iter().enumerate() {
        if tty {
            eprint!(
                "\rscrub: volume {}/{} ({name}), {} verified\x1b[K",
                i + 1,
                names.len(),
                human_size(bytes)
            );
            let _ = std::io::stderr().flush();
        }
        let r = match ask(
            socket,
            &Request::Scrub {
                names: vec![name.clone()],
            },
        )? {
            Some(Reply::Scrub(r)) => r,
            other => return Err(unexpected(other)),
        };
        for v in &r.volumes {
            for p in &v.problems {
                if tty {
                    eprint!("\r\x1b[K");
                }
                println!("{p}");
                bad += 1;
            }
        }
        chunks += r.chunks;
        bytes += r.bytes;
    }
    if tty {
        eprint!("\r\x1b[K");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "scrubbed {} volume(s): {chunks} chunks, {} in {secs:.1} s ({:.0} MB/s), {}",
        names.len(),
        human_size(bytes),
        bytes as f64 / 1e6 / secs.max(1e-3),
        if bad == 0 {
            "no corrupt chunk".to_string()
        } else {
            format!("{bad} corrupt chunk(s)")
        }
    );
    if bad > 0 {
        return Err(format!(
            "{bad} corrupt chunk(s): restore those files from a snapshot or backup"
        ));
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T, pretty: bool) -> Result<String, String> {
    let r = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    };
    r.map_err(|e| format!("formatting JSON: {e}"))
}

/// A volume as `docker volume inspect` shows one.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerVolume<'a> {
    name: &'a str,
    driver: &'static str,
    created_at: String,
    labels: &'a BTreeMap<String, String>,
    options: &'a BTreeMap<String, String>,
    scope: &'static str,
    mountpoints: Vec<DockerMount<'a>>,
    usage: Option<DockerUsage>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerMount<'a> {
    path: &'a std::path::Path,
    read_only: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerUsage {
    bytes: u64,
    inodes: u64,
    limit_bytes: Option<u64>,
}

fn docker_volume(v: &VolumeInfo) -> DockerVolume<'_> {
    DockerVolume {
        name: &v.name,
        driver: "volfs",
        created_at: rfc3339(v.created),
        labels: &v.labels,
        options: &v.options,
        scope: "local",
        mountpoints: v
            .mounts
            .iter()
            .map(|m| DockerMount {
                path: &m.path,
                read_only: m.read_only,
            })
            .collect(),
        usage: v.usage.map(|u| DockerUsage {
            bytes: u.bytes,
            inodes: u.inodes,
            limit_bytes: v.limit_bytes,
        }),
    }
}

fn print_ls(vols: &[VolumeInfo], format: Format, quiet: bool) -> Result<(), String> {
    if quiet {
        for v in vols {
            println!("{}", v.name);
        }
        return Ok(());
    }
    if format == Format::Json {
        for v in vols {
            println!("{}", to_json(&docker_volume(v), false)?);
        }
        return Ok(());
    }
    let width = vols.iter().map(|v| v.name.len()).max().unwrap_or(0).max(11);
    println!("{:width$}  MOUNTPOINTS", "VOLUME NAME");
    for v in vols {
        let mounts: Vec<String> = v
            .mounts
            .iter()
            .map(|m| match (&m.snapshot, m.read_only) {
                (Some(s), _) => format!("{} (ro @{s})", m.path.display()),
                (None, true) => format!("{} (ro)", m.path.display()),
                (None, false) => m.path.display().to_string(),
            })
            .collect();
        println!("{:width$}  {}", v.name, mounts.join(", "));
    }
    Ok(())
}

/// One row of `volfs df --format json`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DfRow<'a> {
    name: &'a str,
    mounts: usize,
    bytes: u64,
    size: String,
    inodes: u64,
    limit_bytes: Option<u64>,
}

fn print_df(vols: &[VolumeInfo], format: Format) -> Result<(), String> {
    let rows: Vec<DfRow<'_>> = vols
        .iter()
        .map(|v| {
            let u = v.usage.unwrap_or_default();
            DfRow {
                name: &v.name,
                mounts: v.mounts.len(),
                bytes: u.bytes,
                size: human_size(u.bytes),
                inodes: u.inodes,
                limit_bytes: v.limit_bytes,
            }
        })
        .collect();
    if format == Format::Json {
        for r in &rows {
            println!("{}", to_json(r, false)?);
        }
        return Ok(());
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(11);
    println!(
        "{:width$}  {:>6}  {:>10}  {:>8}  {:>10}",
        "VOLUME NAME", "MOUNTS", "SIZE", "INODES", "LIMIT"
    );
    for r in &rows {
        let limit = r.limit_bytes.map_or_else(|| "-".to_string(), human_size);
        println!(
            "{:width$}  {:>6}  {:>10}  {:>8}  {:>10}",
            r.name, r.mounts, r.size, r.inodes, limit
        );
    }
    Ok(())
}
