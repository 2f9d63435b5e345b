//! The listener: accepts clients (Unix or TCP socket), limits how many are served at once,
//! and shuts down cleanly: stop accepting, let every connection finish its in-flight
//! requests, then flush.

use crate::conn::{self, Io, Shared};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// A bound listener.
pub enum Listener {
    /// Unix socket (the path is removed when the server stops).
    Unix(UnixListener, PathBuf),
    /// TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Bind `l`. A stale Unix socket file at the path is replaced, as QEMU does.
    pub async fn bind(l: &Listen) -> std::io::Result<Listener> {
        match l {
            Listen::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    }
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
            Listen::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        match self {
            Listener::Unix(l, _) => {
                let s = l.accept().await?.0;
                set_send_buffer(&s, UNIX_SNDBUF);
                Ok(Box::new(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
        }
    }

    /// The TCP address bound (for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Send buffer of a Unix socket connection. The default (`net.core.wmem_default`, 208 KiB) is
/// smaller than one 256 KiB read reply of nbdcopy, so every reply took two or more writes and a
/// wait for the client; with 2 MiB the writer sends several replies per wake-up (nbdcopy with the
/// client on the server's CPU: about 500 context switches instead of 6000 per GiB). The kernel
/// caps it at `net.core.wmem_max`. TCP sockets keep the kernel's automatic sizing.
const UNIX_SNDBUF: libc::c_int = 2 << 20;

/// Ask for a send buffer of `bytes` (best effort: a refusal leaves the default).
fn set_send_buffer(s: &tokio::net::UnixStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: `s` owns an open socket for the whole call, and the option value is a c_int
    // whose size is passed with it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Server behaviour.
#[derive(Debug, Clone)]
pub struct Options {
    /// Keep serving after the last client leaves (`-t`).
    pub persistent: bool,
    /// Clients served at once (`-e`); 0 for no limit.
    pub shared: usize,
    /// Print connection errors on stderr.
    pub verbose: bool,
}

/// Serve until `stop` becomes true (a signal) or, without `persistent`, until the last
/// client has left. In-flight requests finish before this returns; the export is flushed.
pub async fn run(
    listener: Listener,
    shared: Arc<Shared>,
    opts: Options,
    stop_tx: watch::Sender<bool>,
) -> Result<(), String> {
    let limit = Arc::new(Semaphore::new(if opts.shared == 0 {
        Semaphore::MAX_PERMITS
    } else {
        opts.shared
    }));
    let active = Arc::new(AtomicUsize::new(0));
    let left = Arc::new(Notify::new());
    let mut served_one = false;
    let mut conns = JoinSet::new();
    let mut stop = stop_tx.subscribe();
    loop {
        if *stop.borrow() {
            break;
        }
        if served_one && !opts.persistent && active.load(Ordering::SeqCst) == 0 {
            break;
        }
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
            _ = stop.wait_for(|&s| s) => break,
            _ = left.notified() => continue,
        };
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = stop.wait_for(|&s| s) => break,
            _ = left.notified() => continue,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if opts.verbose {
                    eprintln!("qcow2rs serve: accept: {e}");
                }
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        served_one = true;
        active.fetch_add(1, Ordering::SeqCst);
        let sh = shared.clone();
        let active = active.clone();
        let left = left.clone();
        let verbose = opts.verbose;
        conns.spawn(async move {
            let r = conn::serve(stream, sh).await;
            if let (Err(e), true) = (&r, verbose) {
                eprintln!("qcow2rs serve: connection closed: {e}");
            }
            drop(permit);
            active.fetch_sub(1, Ordering::SeqCst);
            left.notify_one();
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    // Connections stop reading new requests, finish those in flight and close.
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    shared
        .export
        .flush()
        .await
        .map_err(|e| format!("flush: {}", e.msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(s: &tokio::net::UnixStream) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `s` owns an open socket; `v` and `len` are valid for the call.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    #[tokio::test]
    async fn unix_connections_get_a_larger_send_buffer() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let before = send_buffer(&a);
        set_send_buffer(&a, UNIX_SNDBUF);
        let after = send_buffer(&a);
        // The kernel doubles the value asked for, capped by net.core.wmem_max.
        let max: libc::c_int = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if max > before / 2 {
            assert!(after > before, "SO_SNDBUF {before} -> {after}");
        }
        assert!(after >= before.min(UNIX_SNDBUF));
    }
}
