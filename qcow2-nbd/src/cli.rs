//! `qcow2rs serve`: its options (qemu-nbd's names, a clap `Args` that qcow2-cli embeds) and the
//! server's life cycle.

use crate::conn::Shared;
use crate::export::{DirtyBitmap, Export};
use crate::handshake::ExportInfo;
use crate::server::{self, Listen, Listener};
use qcow2_core::{Disk, Format, OpenOptions};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// `qcow2rs serve`'s options (qemu-nbd's names), declared once: they parse the command line
/// and make its `--help`, completions and man page (the `serve` subcommand of qcow2-cli).
/// [`ServeArgs::check`] applies the rules that tie options together.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "As qemu-nbd: without -k the server listens on TCP 127.0.0.1:10809, and it exits \
when its last client leaves unless -t is given."
)]
pub struct ServeArgs {
    /// Listen on a Unix socket
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Listen on this address (default 127.0.0.1 when -k is not given)
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    pub bind: Option<String>,
    /// TCP port (default 10809)
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<u16>,
    /// Export read-only
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Writes go to a temporary overlay, discarded at exit (the image is only read)
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,
    /// Export an internal snapshot, read-only: an ID or a name, or
    /// snapshot.id=ID[,snapshot.name=NAME] / snapshot.name=NAME
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT_PARAM",
          value_parser = snapshot_param)]
    pub load_snapshot: Option<qcow2_core::SnapshotKey>,
    /// Export name (default ''; the empty name always selects it)
    #[arg(short = 'x', long = "export-name", value_name = "NAME", default_value = "",
          hide_default_value = true, value_parser = |v: &str| max_string(v, "export name"))]
    pub name: String,
    /// Export description
    #[arg(short = 'D', long = "description", value_name = "TEXT", default_value = "",
          hide_default_value = true, value_parser = |v: &str| max_string(v, "description"))]
    pub description: String,
    /// Clients served at once (default 1; 0: no limit)
    #[arg(
        short = 'e',
        long = "shared",
        value_name = "NUM",
        default_value_t = 1,
        hide_default_value = true
    )]
    pub shared: usize,
    /// Keep serving after the last client leaves
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,
    /// Run in the background: the command returns once the server listens (exit 1 if it
    /// could not start)
    #[arg(long = "fork")]
    pub fork: bool,
    /// Write the process id there once listening
    #[arg(long = "pid-file", value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Image format: qcow2 or raw (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT",
          value_parser = |v: &str| Format::parse(v).map_err(|e| e.to_string()))]
    pub format: Option<Format>,
    /// IMAGE is an option string: driver=qcow2|raw,
    /// file.filename=PATH (or file=PATH)[,read-only=on|off]
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Accepted for qemu-nbd compatibility: the qemu:allocation-depth context is always
    /// offered
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Offer the persistent dirty bitmap NAME (of the image or of a backing file) as the
    /// block status context qemu:dirty-bitmap:NAME (dirty ranges have flag 1); may be
    /// repeated. An enabled bitmap of the image a writable export writes to is live:
    /// writes, zeroing and trims through the export show in it at once (and are stored in
    /// the image at exit); other bitmaps do not change
    #[arg(short = 'B', long = "bitmap", value_name = "NAME", action = clap::ArgAction::Append)]
    pub bitmaps: Vec<String>,
    /// Cache mode: none, writeback (default), writethrough, directsync or unsafe
    /// (writeback with the clients' flushes acknowledged without reaching the disk)
    #[arg(long = "cache", value_name = "MODE", default_value = "writeback",
          hide_default_value = true, hide_possible_values = true,
          value_parser = ["none", "writeback", "writethrough", "directsync", "unsafe"])]
    pub cache: String,
    /// Require TLS: DIR holds server-cert.pem, server-key.pem and optionally ca-cert.pem
    /// (qemu's x509 credentials layout); with ca-cert.pem a client certificate is optional
    /// and verified against it when presented
    #[arg(long = "tls-creds", value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Require client certificates signed by DIR/ca-cert.pem
    #[arg(long = "tls-verify-peer")]
    pub tls_verify_peer: bool,
    /// Seconds a client may take for the handshake (default 10)
    #[arg(
        long = "handshake-limit",
        value_name = "N",
        default_value_t = 10,
        hide_default_value = true
    )]
    pub handshake_limit: u64,
    /// Open a read-only image that another process writes
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Refuse files named inside the image (backing, data file)
    #[arg(long = "untrusted")]
    pub untrusted: bool,
    /// Report connection errors on stderr
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// The image to export (with --image-opts: its option string)
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Further operands (refused: one image only)
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

/// `-x`, `-D`: a string the handshake can carry.
fn max_string(v: &str, what: &str) -> Result<String, String> {
    if v.len() > crate::proto::MAX_STRING {
        return Err(format!("{what} longer than 4096 bytes"));
    }
    Ok(v.to_string())
}

impl ServeArgs {
    /// The rules between options (as qemu-nbd's): `--image-opts` read into the image, the
    /// format and read-only; `-l` exports read-only; the conflicting combinations refused.
    pub fn check(mut self) -> Result<ServeArgs, String> {
        if let Some(arg) = self.extra.first() {
            return Err(format!("too many arguments: '{arg}' (expecting one image)"));
        }
        if self.socket.is_some() && (self.bind.is_some() || self.port.is_some()) {
            return Err("-k/--socket cannot be combined with -b/--bind or -p/--port".into());
        }
        if self.image_opts {
            image_opts(&mut self)?;
        }
        if self.load_snapshot.is_some() {
            // As qemu-nbd: a snapshot is exported read-only.
            if self.snapshot {
                return Err("-l/--load-snapshot cannot be combined with -s/--snapshot".into());
            }
            self.read_only = true;
        }
        if self.snapshot && self.untrusted {
            // The overlay names the image as its backing file, which --untrusted refuses.
            return Err("-s/--snapshot cannot be combined with --untrusted".into());
        }
        if self.force_share && !self.read_only {
            return Err("--force-share requires --read-only".into());
        }
        if self.image.is_none() {
            return Err("expecting an image file name".into());
        }
        Ok(self)
    }
}

/// `-l`: `snapshot.id=ID[,snapshot.name=NAME]`, `snapshot.name=NAME`, or an ID or a name.
fn snapshot_param(l: &str) -> Result<qcow2_core::SnapshotKey, String> {
    use qcow2_core::SnapshotKey;
    if !l.starts_with("snapshot.") {
        return Ok(SnapshotKey::IdOrName(l.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for part in l.split(',') {
        match part.split_once('=') {
            Some(("snapshot.id", v)) => id = Some(v.to_string()),
            Some(("snapshot.name", v)) => name = Some(v.to_string()),
            _ => return Err(format!("invalid snapshot parameter '{part}'")),
        }
    }
    Ok(match (id, name) {
        (Some(i), Some(n)) => SnapshotKey::IdAndName(i, n),
        (Some(i), None) => SnapshotKey::Id(i),
        (None, Some(n)) => SnapshotKey::Name(n),
        (None, None) => return Err(format!("invalid snapshot parameter '{l}'")),
    })
}

/// `--image-opts`: read the image argument as `key=value` pairs (`,,` is a comma).
fn image_opts(a: &mut ServeArgs) -> Result<(), String> {
    let Some(spec) = a.image.take() else {
        return Ok(());
    };
    let spec = spec.to_string_lossy().into_owned();
    let pairs = qcow2_core::create::split_options(&spec).map_err(|e| e.to_string())?;
    for (k, v) in pairs {
        match k.as_str() {
            "driver" => {
                let f = Format::parse(&v).map_err(|e| e.to_string())?;
                if a.format.is_some_and(|g| g != f) {
                    return Err(format!("driver={v} contradicts -f"));
                }
                a.format = Some(f);
            }
            "file" | "file.filename" | "filename" => a.image = Some(PathBuf::from(v)),
            "file.driver" if v == "file" => {}
            "read-only" => match v.as_str() {
                "on" | "true" => a.read_only = true,
                "off" | "false" => {}
                _ => return Err(format!("invalid value '{v}' for read-only (on or off)")),
            },
            _ => return Err(format!("unsupported image option '{k}' in --image-opts")),
        }
    }
    if a.image.is_none() {
        return Err("--image-opts: no file.filename=PATH given".into());
    }
    Ok(())
}

/// Run `qcow2rs serve` and return the exit status: `a` parsed from `argv`, the arguments
/// after `serve` as given (`--fork` runs them again). Prints its own errors (one line).
/// Must be called inside a multi-threaded Tokio runtime.
pub async fn run(a: ServeArgs, argv: &[String]) -> u8 {
    let a = match a.check() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("qcow2rs: {e} (try 'qcow2rs serve --help')");
            return 1;
        }
    };
    if a.fork && std::env::var_os(READY_FD).is_none() {
        return fork(argv).await;
    }
    match serve(a).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2rs serve: {}", e.replace('\n', " "));
            1
        }
    }
}

/// The positions in `argv` (serve's arguments) of the `--fork` flags, as the parser reads
/// them: not an option's value (`-x --fork` names the export "--fork"), nothing after `--`.
fn fork_flags(argv: &[String]) -> Vec<usize> {
    use clap::Args as _;
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    let takes_value = |pick: &dyn Fn(&clap::Arg) -> bool| {
        cmd.get_arguments()
            .any(|a| pick(a) && a.get_action().takes_values())
    };
    let mut flags = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let arg = argv[i].as_str();
        i += 1;
        let value_follows = if arg == "--" {
            break;
        } else if arg == "--fork" {
            flags.push(i - 1);
            false
        } else if let Some(long) = arg.strip_prefix("--") {
            !long.contains('=') && takes_value(&|a| a.get_long() == Some(long))
        } else if let Some(shorts) = arg.strip_prefix('-') {
            // A group of short options: the first that takes a value takes the rest of
            // the group, or the next argument when it ends the group.
            let mut rest = shorts.chars();
            let mut follows = false;
            while let Some(c) = rest.next() {
                if takes_value(&|a| a.get_short() == Some(c)) {
                    follows = rest.as_str().is_empty();
                    break;
                }
            }
            follows
        } else {
            false
        };
        if value_follows {
            i += 1;
        }
    }
    flags
}

/// Environment variable naming the pipe a `--fork` child reports on (a byte when it listens).
const READY_FD: &str = "QCOW2RS_SERVE_READY_FD";

/// `--fork`: start the same command in the background (a new session, stdin and stdout on
/// /dev/null, stderr inherited) and wait until it listens (exit 0) or fails (exit 1; it has
/// printed why). Re-executing instead of fork(2): this process already runs threads.
async fn fork(args: &[String]) -> u8 {
    let args = args.to_vec();
    let go = move || -> Result<u8, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let (mut rd, wr) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
        use std::os::fd::AsRawFd;
        let fd = wr.as_raw_fd();
        // SAFETY: plain fcntl on a descriptor we own; clears close-on-exec so the child
        // inherits the pipe's write end.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
        // Run this process's command line again (for the wheel's console script that is
        // `python3 .../qcow2rs serve ...`), which must end with `serve ARGS`; not when the
        // command line was handed over some other way (a Python program calling the CLI).
        let cmdline: Vec<String> = std::env::args().collect();
        let tail = args.len() + 1;
        if cmdline.len() < tail + 1
            || cmdline[cmdline.len() - tail] != "serve"
            || cmdline[cmdline.len() - args.len()..] != args[..]
        {
            return Err("--fork works only when run as a command (qcow2rs serve ...)".into());
        }
        let forks = fork_flags(&args);
        let mut child = std::process::Command::new(self_program(&cmdline[0], &exe))
            .args(&cmdline[1..cmdline.len() - args.len()])
            .args(
                args.iter()
                    .enumerate()
                    .filter(|(i, _)| !forks.contains(i))
                    .map(|(_, a)| a),
            )
            .env(READY_FD, fd.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        drop(wr);
        let mut b = [0u8; 1];
        use std::io::Read;
        match rd.read(&mut b) {
            Ok(1) => Ok(0),
            _ => {
                // It exited before listening (its error is on stderr already).
                let _ = child.wait();
                Ok(1)
            }
        }
    };
    match tokio::task::spawn_blocking(go).await {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("qcow2rs serve: {e}");
            1
        }
        Err(e) => {
            eprintln!("qcow2rs serve: {e}");
            1
        }
    }
}

/// The program `--fork` runs again: `argv0` (looked up in `PATH` when it has no '/') when
/// it is this same executable under another name, else `exe`. A virtual environment's
/// `python` is a symlink to the interpreter, and Python uses the environment (where the
/// wheel is installed) only when started by that path: the console script's `--fork`
/// must not start the bare interpreter that `exe` names.
fn self_program(argv0: &str, exe: &std::path::Path) -> PathBuf {
    let found = if argv0.contains('/') {
        Some(PathBuf::from(argv0))
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(argv0))
                .find(|f| f.is_file())
        })
    };
    let same = |c: &PathBuf| {
        let a = std::fs::canonicalize(c).ok();
        a.is_some() && a == std::fs::canonicalize(exe).ok()
    };
    match found {
        Some(c) if !argv0.is_empty() && same(&c) => c,
        _ => exe.to_path_buf(),
    }
}

/// In a `--fork` child: leave the parent's session (so its terminal's signals do not reach
/// us) and tell it the server listens.
fn report_ready() {
    let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
    else {
        return;
    };
    // SAFETY: setsid has no memory effects; it fails harmlessly if we lead a group already.
    unsafe { libc::setsid() };
    // SAFETY: the parent passed this descriptor (the write end of its pipe) for us to
    // own; nothing else in this process uses it.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::io::Write;
    let _ = f.write_all(b"\n");
}

/// `-s`: a temporary qcow2 overlay over the image, opened and unlinked at once (writes go
/// there and vanish with the process).
async fn overlay(
    image: &std::path::Path,
    format: Option<Format>,
    opts: &OpenOptions,
) -> Result<Disk, String> {
    let abs = std::fs::canonicalize(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let fmt = match format {
        Some(f) => f,
        None => qcow2_core::disk::probe(&abs)
            .await
            .map_err(|e| e.to_string())?,
    };
    let dir = std::env::temp_dir().join(format!(
        "qcow2rs-serve-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("overlay.qcow2");
    let co = qcow2_core::create::CreateOptions {
        backing_file: Some(abs.to_string_lossy().into_owned()),
        backing_format: Some(match fmt {
            Format::Raw => "raw".into(),
            _ => "qcow2".into(),
        }),
        ..Default::default()
    };
    let made = qcow2_core::create::create_qcow2(&path, &co).await;
    let disk = match made {
        Ok(_) => Disk::open(&path, Some(Format::Qcow2), opts).await,
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    disk.map_err(|e| format!("temporary overlay: {e}"))
}

/// `-B NAME`: bitmap `name` of the first layer of `disk`'s chain that has one of that name
/// (as qemu-nbd looks for it), its bits as read now. An enabled bitmap of the top layer of
/// a writable export is live (as qemu-nbd's): block status shows the writes made through
/// the export, which the engine records in it.
async fn load_bitmap(disk: &Disk, name: &str) -> Result<DirtyBitmap, String> {
    let mut layer = Some(disk);
    let mut top = true;
    while let Some(d) = layer {
        if let Disk::Qcow2(img) = d {
            match img.bitmap_content(name).await {
                Ok((bits, granularity)) => {
                    let b = DirtyBitmap::new(name.to_string(), bits, granularity, d.size());
                    let enabled = img.bitmaps().iter().any(|e| {
                        e.name == name && e.flags & qcow2_core::format::bitmaps::FLAG_AUTO != 0
                    });
                    return Ok(if top && img.is_writable() && enabled {
                        b.live()
                    } else {
                        b
                    });
                }
                Err(e) if e.kind() == qcow2_core::ErrorKind::NotFound => {}
                // qemu-nbd's message, without the QMP hint the core adds.
                Err(e) => return Err(e.to_string().lines().next().unwrap_or("").to_string()),
            }
        }
        layer = d.backing();
        top = false;
    }
    Err(format!("Bitmap '{name}' is not found"))
}

/// How `serve` opens the image: `--cache` as qemu-nbd reads it (`none` and `directsync`
/// bypass the page cache; `unsafe` ignores flushes, the clients' and the engine's own).
fn open_options(a: &ServeArgs) -> OpenOptions {
    let mut o = OpenOptions::default();
    o.writable = !a.read_only;
    o.no_external_files = a.untrusted;
    o.force_share = a.force_share;
    o.snapshot = a.load_snapshot.clone();
    // The parser admits only QEMU's names.
    qcow2_core::CacheMode::parse(&a.cache)
        .unwrap_or_default()
        .apply(&mut o);
    o
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let image = a.image.clone().unwrap();
    let opts = open_options(&a);
    let disk = if a.snapshot {
        overlay(&image, a.format, &opts).await?
    } else {
        Disk::open(&image, a.format, &opts)
            .await
            .map_err(|e| e.to_string())?
    };
    // -B: as qemu-nbd, the contexts are offered in the reverse order of the options.
    let mut names: Vec<&String> = Vec::new();
    for n in a.bitmaps.iter().rev() {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    if names.len() > crate::handshake::MAX_BITMAPS {
        return Err(format!(
            "at most {} bitmaps can be exported",
            crate::handshake::MAX_BITMAPS
        ));
    }
    let mut bitmaps = Vec::new();
    for n in names {
        bitmaps.push(load_bitmap(&disk, n).await?);
    }
    let mut export = Export::new(disk, !a.read_only);
    export.bitmaps = bitmaps;
    export.writethrough = matches!(a.cache.as_str(), "writethrough" | "directsync");
    let export = Arc::new(export);

    let tls = match &a.tls_creds {
        Some(dir) => Some(crate::tls::acceptor(dir, a.tls_verify_peer)?),
        None => None,
    };
    let listen = match &a.socket {
        Some(p) => Listen::Unix(p.clone()),
        None => {
            let host = a.bind.clone().unwrap_or_else(|| "127.0.0.1".into());
            let ip: IpAddr = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| format!("invalid bind address '{host}' (an IP address)"))?;
            if !ip.is_loopback() && tls.is_none() {
                eprintln!(
                    "qcow2rs serve: warning: serving on {ip} without TLS: anyone who can reach \
                     this address can read{} the image (use --tls-creds)",
                    if a.read_only { "" } else { " and write" }
                );
            }
            Listen::Tcp(SocketAddr::new(ip, a.port.unwrap_or(10809)))
        }
    };
    let listener = Listener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen:?}: {e}"))?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // SIGTERM/SIGINT: stop accepting, finish in-flight requests, flush, close.
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let tx = stop_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            let _ = tx.send(true);
        });
    }
    report_ready();
    let info = ExportInfo {
        name: a.name.clone(),
        description: a.description.clone(),
        size: export.size(),
        read_only: !export.writable(),
        min_block: if opts.direct { 512 } else { 1 },
        pref_block: 4096,
        tls: tls.is_some(),
        multi_conn: a.shared != 1,
        bitmaps: export.bitmaps.iter().map(|b| b.name.clone()).collect(),
    };
    let shared = Arc::new(Shared {
        export: export.clone(),
        info,
        tls,
        shutdown: stop_rx,
        handshake_limit: Duration::from_secs(a.handshake_limit.max(1)),
    });
    let res = server::run(
        listener,
        shared,
        server::Options {
            persistent: a.persistent,
            shared: a.shared,
            verbose: a.verbose,
        },
        stop_tx,
    )
    .await;
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    res?;
    // Every connection is gone: close the image (flush, give back reserved space).
    match Arc::try_unwrap(export) {
        Ok(e) => match e.into_disk() {
            Disk::Qcow2(i) => i.close().await.map_err(|e| e.to_string()),
            d => d.flush().await.map_err(|e| e.to_string()),
        },
        Err(e) => e.flush().await.map_err(|e| e.msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse as the `serve` subcommand of qcow2-cli does, then check.
    fn p(v: &[&str]) -> Result<ServeArgs, String> {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(true));
        let m = cmd.try_get_matches_from(v).map_err(|e| e.to_string())?;
        ServeArgs::from_arg_matches(&m)
            .map_err(|e| e.to_string())?
            .check()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options() {
        let a = p(&["-k", "/tmp/s", "-r", "-xname", "--shared=4", "-t", "img"]).unwrap();
        assert_eq!(a.socket.unwrap(), PathBuf::from("/tmp/s"));
        assert!(a.read_only && a.persistent);
        assert_eq!((a.name.as_str(), a.shared), ("name", 4));
        assert!(p(&["-k", "s", "-p", "1", "img"]).is_err());
        assert!(p(&["--cache=bogus", "img"]).is_err());
        assert!(p(&["--nope", "img"]).is_err());
        assert!(p(&["-k"]).is_err());
        assert!(p(&["a", "b"]).is_err());
        assert!(p(&["-h"]).is_err(), "help is the parser's");
        assert!(p(&["-p", "65536", "img"]).is_err());
        assert!(p(&["-x", &"n".repeat(4097), "img"]).is_err());
        assert!(
            p(&["-U", "img"]).is_err(),
            "--force-share requires --read-only"
        );
        assert!(p(&["-U", "-r", "img"]).is_ok());
        assert!(p(&[]).is_err());
        let exe = std::env::current_exe().unwrap();
        assert_eq!(self_program(exe.to_str().unwrap(), &exe), exe);
        assert_eq!(self_program("/nonexistent/x", &exe), exe);
        assert_eq!(self_program("", &exe), exe);
        // A symlink to the executable (a venv's python) is kept as it is.
        let dir = std::env::temp_dir().join(format!("qcow2rs-selfprog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("python");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        assert_eq!(self_program(link.to_str().unwrap(), &exe), link);
        std::fs::remove_dir_all(&dir).unwrap();
        let a = p(&["-B", "b0", "--bitmap=b1", "-Bb2", "img"]).unwrap();
        assert_eq!(a.bitmaps, ["b0", "b1", "b2"]);
    }

    /// `--cache` as qemu-nbd reads it: which modes bypass the page cache, and `unsafe`
    /// (ignore flushes) accepted and carried into the image's options.
    #[test]
    fn cache_modes() {
        for (mode, direct, no_flush, write_through) in [
            ("writeback", false, false, false),
            ("writethrough", false, false, true),
            ("none", true, false, false),
            ("directsync", true, false, true),
            ("unsafe", false, true, false),
        ] {
            let o = open_options(&p(&[&format!("--cache={mode}"), "img"]).unwrap());
            assert_eq!(
                (o.direct, o.no_flush, o.write_through),
                (direct, no_flush, write_through),
                "{mode}"
            );
        }
        let o = open_options(&p(&["img"]).unwrap());
        assert_eq!(
            (o.direct, o.no_flush, o.write_through, o.writable),
            (false, false, false, true)
        );
    }

    #[test]
    fn snapshot_fork_image_opts() {
        let a = p(&["-l", "snapshot.id=3,snapshot.name=x", "img"]).unwrap();
        assert!(a.read_only, "-l exports read-only");
        assert!(
            matches!(a.load_snapshot, Some(qcow2_core::SnapshotKey::IdAndName(ref i, ref n)) if i == "3" && n == "x")
        );
        assert!(p(&["-l", "snapshot.bogus=1", "img"]).is_err());
        assert!(p(&["-l", "s", "-s", "img"]).is_err());
        assert!(p(&["-s", "--untrusted", "img"]).is_err());
        let a = p(&["-s", "--fork", "-A", "img"]).unwrap();
        assert!(a.snapshot && a.fork && !a.read_only);
        // The --fork flags, not an option's value, nor an operand after "--".
        let argv = strings(&[
            "--fork", "-x", "--fork", "-rx", "--fork", "--fork", "-xr", "--fork",
        ]);
        assert_eq!(fork_flags(&argv), [0, 5, 7]);
        let argv = strings(&[
            "--export-name",
            "--fork",
            "--cache=none",
            "--fork",
            "--",
            "--fork",
        ]);
        assert_eq!(fork_flags(&argv), [3]);
        let a = p(&[
            "--image-opts",
            "driver=raw,file.filename=/a,,b,read-only=on",
        ])
        .unwrap();
        assert_eq!(a.image.unwrap(), PathBuf::from("/a,b"));
        assert_eq!(a.format, Some(Format::Raw));
        assert!(a.read_only);
        assert!(p(&["--image-opts", "driver=raw"]).is_err());
        assert!(p(&["--image-opts", "file=x,cache.direct=on"]).is_err());
        assert!(p(&["-f", "qcow2", "--image-opts", "driver=raw,file=x"]).is_err());
    }
}
