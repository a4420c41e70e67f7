//! `volfs`: the command-line client of `volfs-mountd`, in the style of `docker volume`.
//!
//! Every command exits 0 on success and 1 on any failure, with `volfs: what failed` on
//! stderr. Commands taking several names (`inspect`, `rm`) handle each one, report each
//! failure, and exit 1 if any failed, as Docker does: `inspect a missing` prints the array
//! with `a` and reports `no such volume: missing`.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
        Cmd::Rm { force, names } => {
            let mut failed = false;
            for name in names {
                match ask(socket, &Request::Rm { name, force }) {
                    Ok(Some(Reply::Removed(r))) => println!("{}", r.name),
                    Ok(other) => return Err(unexpected(other)),
                    Err(e) => {
                        eprintln!("volfs: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Err(String::new());
            }
        }
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
        Cmd::Snapshot(SnapshotCmd::Rm { targets }) => {
            let mut failed = false;
            for t in targets {
                let r = snapshot_target(&t).and_then(|(name, snapshot)| {
                    ask(socket, &Request::SnapshotRm { name, snapshot })
                });
                match r {
                    Ok(Some(Reply::Snapshot(s))) => println!("{}@{}", s.volume, s.name),
                    Ok(other) => return Err(unexpected(other)),
                    Err(e) => {
                        eprintln!("volfs: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Err(String::new());
            }
        }
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
                (Some(s), _) => format!("{} (ro, @{s})", m.path.display()),
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
