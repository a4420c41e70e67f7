//! `volfs-mountd`: owns the store, serves every mount, answers the control socket and
//! Docker's volume-plugin socket (`volfs::plugin`).
//! Runs in the foreground; SIGTERM or SIGINT stop it for a restart (the mounts stay),
//! `volfs shutdown` unmounts everything; both remove the sockets.
//! Logs go to stderr, filtered by `RUST_LOG` (or its alias `VOLFS_LOG`; default `info`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use volfs::api::{self, Response};
use volfs::plugin::{self, Plugin};
use volfs::volume::Registry;

/// Serves volfs volumes over FUSE from one sled store.
#[derive(Parser, Debug)]
#[command(name = "volfs-mountd", version)]
struct Args {
    /// Directory holding the store (created if missing).
    #[arg(long, default_value = "/var/lib/volfs")]
    root: PathBuf,
    /// Control socket for the `volfs` CLI (mode 0600: root only).
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Run as the keeper of FUSE connections for ROOT (started by the daemon itself).
    #[arg(long, hide = true)]
    keeper: bool,
    /// Let this group use the control socket too (mode 0660, owned by root:GROUP).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Docker volume-plugin socket. dockerd finds plugins in /run/docker/plugins by file
    /// name: `volfs.sock` there is the driver `volfs` (`docker volume create -d volfs`).
    #[arg(long, value_name = "PATH", default_value = plugin::DEFAULT_SOCKET)]
    plugin_socket: PathBuf,
    /// Do not serve Docker's volume-plugin protocol.
    #[arg(long)]
    no_plugin: bool,
}

fn main() {
    let filter = ["RUST_LOG", "VOLFS_LOG"]
        .iter()
        .find_map(|var| tracing_subscriber::EnvFilter::try_from_env(var).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("volfs-mountd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.keeper {
        return volfs::keeper::serve(&args.root).map_err(anyhow::Error::msg);
    }
    // Signals are taken synchronously by the main thread; every other thread inherits the
    // mask, so none of them is interrupted.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking signals")?;

    let group = match &args.socket_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("looking up group {name}"))?
                .with_context(|| {
                    format!(
                        "--socket-group {name}: no such group (see /etc/group or `getent group`)"
                    )
                })?
                .gid,
        ),
        None => None,
    };
    // The socket first: it also tells whether another daemon already serves.
    let listener = bind(&args.socket, group)?;
    let plugin_socket = (!args.no_plugin).then(|| args.plugin_socket.clone());
    if let Some(p) = &plugin_socket {
        if UnixStream::connect(p).is_ok() {
            let _ = std::fs::remove_file(&args.socket);
            bail!(
                "something already answers on the plugin socket {}; stop it first, or \
                 choose --plugin-socket or --no-plugin",
                p.display()
            );
        }
    }
    let registry = match Registry::open(&args.root) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            let _ = std::fs::remove_file(&args.socket);
            bail!(e);
        }
    };
    registry.watch_keeper();
    // Docker's socket only now that every volume can be answered for: dockerd forgets a
    // volume whose Get fails.
    let plugin = match &plugin_socket {
        Some(path) => {
            let started = Plugin::new(registry.clone())
                .and_then(|p| plugin::bind(path).map(|l| (Arc::new(p), l)));
            let (plugin, plugin_listener) = match started {
                Ok(v) => v,
                Err(e) => {
                    let _ = std::fs::remove_file(&args.socket);
                    bail!(e);
                }
            };
            let p = plugin.clone();
            std::thread::Builder::new()
                .name("plugin".into())
                .spawn(move || p.serve(plugin_listener))
                .context("starting the plugin thread")?;
            Some(plugin)
        }
        None => None,
    };
    let sockets: Arc<Vec<PathBuf>> = Arc::new(
        std::iter::once(args.socket.clone())
            .chain(plugin_socket.clone())
            .collect(),
    );
    tracing::info!(
        root = %args.root.display(),
        socket = %args.socket.display(),
        plugin_socket = %plugin_socket.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        "volfs-mountd ready"
    );

    let reg = registry.clone();
    let socks = sockets.clone();
    let plug = plugin.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let reg = reg.clone();
                        let socks = socks.clone();
                        let plug = plug.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || serve(&reg, stream, &socks, plug.as_deref()));
                    }
                    Err(e) => tracing::warn!("accepting a control connection: {e}"),
                }
            }
        })
        .context("starting the control thread")?;

    let sig = signals.wait().context("waiting for signals")?;
    tracing::info!("{sig:?}: stopping; the mounts stay and wait for the next volfs-mountd");
    if let Some(p) = &plugin {
        p.stop();
    }
    for s in sockets.iter() {
        let _ = std::fs::remove_file(s);
    }
    registry.stop_for_restart();
    tracing::info!("volfs-mountd stopped cleanly");
    // Not returning through main: session threads are parked on purpose.
    std::process::exit(0)
}

fn bind(socket: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            bail!(
                "another volfs-mountd already answers on {}; stop it first or choose --socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    // Created 0600 from the start: no window in which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener =
        listener.with_context(|| format!("binding the control socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", socket.display()))?;
    if let Some(gid) = group {
        // Group first, then the mode: the socket is never 0660 for another group.
        nix::unistd::chown(socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("setting the mode of {}", socket.display()))?;
    }
    Ok(listener)
}

/// Answers one control connection. `sockets` are removed before a shutdown.
fn serve(registry: &Registry, stream: UnixStream, sockets: &[PathBuf], plugin: Option<&Plugin>) {
    let mut line = Vec::new();
    // The request line is read through a limit; for `import` the archive follows it, and
    // the reader (with what it buffered past the line) is its source.
    let mut reader = BufReader::new(&stream);
    let read = (&mut reader)
        .take(api::MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line);
    let response = match read {
        Ok(_) => match api::decode_request(line.trim_ascii()) {
            Ok(api::Request::Shutdown) => {
                tracing::info!("shutdown requested: unmounting everything");
                if let Some(p) = plugin {
                    p.stop();
                }
                for s in sockets {
                    let _ = std::fs::remove_file(s);
                }
                registry.shutdown();
                let _ = (&stream).write_all(b"{\"ok\":true}\n");
                tracing::info!("volfs-mountd shut down");
                std::process::exit(0);
            }
            Ok(api::Request::Export { name, snapshot }) => {
                return serve_export(registry, &stream, &name, snapshot.as_deref());
            }
            Ok(api::Request::Import { name, replace }) => {
                tracing::debug!(volume = name, replace, "control request: import");
                registry.handle_import(&name, replace, &mut reader)
            }
            Ok(req) => {
                tracing::debug!(?req, "control request");
                registry.handle(req)
            }
            Err(e) => Response::err(e),
        },
        Err(e) => Response::err(format!("reading the request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
}

/// Answers an `export` request: the answer line, then the archive in frames and its
/// status (see `volfs::api`).
fn serve_export(registry: &Registry, stream: &UnixStream, name: &str, snapshot: Option<&str>) {
    let source = match registry.export_source(name, snapshot) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(volume = name, "export refused: {e}");
            let mut out = serde_json::to_vec(&Response::err(e)).unwrap_or_default();
            out.push(b'\n');
            let _ = (&*stream).write_all(&out);
            return;
        }
    };
    if (&*stream).write_all(b"{\"ok\":true}\n").is_err() {
        return;
    }
    let t0 = std::time::Instant::now();
    let mut frames = api::FrameWriter::new(stream);
    let result = volfs::export::export(&*source.fs, &mut frames, &mut |_| {});
    let status = match &result {
        Ok(stats) => {
            tracing::info!(
                volume = name,
                snapshot,
                files = stats.files,
                dirs = stats.dirs,
                symlinks = stats.symlinks,
                hardlinks = stats.hardlinks,
                others = stats.others,
                skipped_sockets = stats.skipped,
                data_bytes = stats.bytes,
                archive_bytes = stats.archive_bytes,
                secs = t0.elapsed().as_secs_f64(),
                "exported"
            );
            Response::ok()
        }
        Err(e) => {
            tracing::warn!(volume = name, snapshot, "export failed: {e}");
            Response::err(e.clone())
        }
    };
    if let Err(e) = frames.finish(&status) {
        if result.is_ok() {
            tracing::warn!(
                volume = name,
                "export: the client went away at the end: {e}"
            );
        }
    }
    drop(source);
}
