//! `volfs`: the command-line client of `volfs-mountd`, in the style of `docker volume`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use volfs::api::{self, Request, Response};

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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a volume (a no-op if it exists); prints its name.
    Create { name: String },
    /// List volumes and where they are mounted.
    Ls,
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
    /// Unmount everything and stop volfs-mountd (the next start mounts them again).
    Shutdown,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("volfs: {e}");
        std::process::exit(1);
    }
}

fn absolute(path: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(cli: Cli) -> Result<(), String> {
    let req = match cli.cmd {
        Cmd::Create { name } => Request::Create { name },
        Cmd::Ls => Request::Ls,
        Cmd::Mount {
            name,
            path,
            read_only,
        } => Request::Mount {
            name,
            path: absolute(path)?,
            read_only,
        },
        Cmd::Umount { path } => Request::Umount {
            path: absolute(path)?,
        },
        Cmd::Shutdown => Request::Shutdown,
    };
    let resp = api::call(&cli.socket, &req)?;
    if !resp.ok {
        return Err(resp.error.unwrap_or_else(|| "request failed".into()));
    }
    print(&req, &resp);
    Ok(())
}

fn print(req: &Request, resp: &Response) {
    match req {
        Request::Create { .. } => {
            if let Some(v) = &resp.volume {
                println!("{}", v.name);
            }
        }
        Request::Ls => {
            let vols = resp.volumes.as_deref().unwrap_or_default();
            let width = vols.iter().map(|v| v.name.len()).max().unwrap_or(0).max(11);
            println!("{:width$}  MOUNTPOINTS", "VOLUME NAME");
            for v in vols {
                let mounts: Vec<String> = v
                    .mounts
                    .iter()
                    .map(|m| {
                        let ro = if m.read_only { " (ro)" } else { "" };
                        format!("{}{ro}", m.path.display())
                    })
                    .collect();
                println!("{:width$}  {}", v.name, mounts.join(", "));
            }
        }
        Request::Mount { .. } | Request::Umount { .. } | Request::Shutdown => {}
    }
}
