//! One client connection: the handshake driver, then the transmission phase. Requests are
//! read by one loop, run concurrently as tasks, and their replies are written by a writer
//! task of their own, in completion order: the replies queued while it writes go out
//! together in vectored writes, without copying their data. Data buffers (read replies,
//! write payloads) come from a per-connection pool and go back to it once written or used.

use crate::export::{bitmap_extents, extents, Export, OpError};
use crate::handshake::{
    greeting, ExportInfo, Handshake, Negotiated, Step, CTX_ALLOCATION_DEPTH, CTX_BASE_ALLOCATION,
    CTX_DIRTY_BITMAP,
};
use crate::proto::{self, *};
use std::any::Any;
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// A bidirectional byte stream (Unix socket, TCP socket, or TLS over one of them).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The stream itself, to find a socket that splits into owned halves.
    fn as_any(&self) -> &dyn Any;
    /// The stream itself, to take such a socket out of its box.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Take a socket of type `S` out of `s` when that is what it holds.
fn take_socket<S: 'static>(s: Box<dyn Io>) -> Result<S, Box<dyn Io>> {
    // `Io::as_any(&*s)`, not `s.as_any()`: the box is an `Io` too, and would answer for itself.
    if !Io::as_any(&*s).is::<S>() {
        return Err(s);
    }
    match Io::into_any(s).downcast::<S>() {
        Ok(s) => Ok(*s),
        // Not reached: the type was checked above.
        Err(_) => unreachable!("stream type checked"),
    }
}

/// What every connection shares.
pub struct Shared {
    /// The export.
    pub export: Arc<Export>,
    /// What the handshake tells clients.
    pub info: ExportInfo,
    /// TLS acceptor when TLS is required.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Becomes `true` when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Time allowed for the handshake.
    pub handshake_limit: Duration,
}

/// Option data larger than this is refused (discarded) with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION: u32 = 64 << 10;
/// Option data larger than this drops the connection.
const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// Bytes in flight per connection, in units of `UNIT` (request payloads and read buffers).
const BUDGET: u32 = 2048;
const UNIT: u64 = 64 << 10;
/// Most extents in one block status chunk.
const MAX_EXTENTS: usize = 1 << 16;

/// Serve one client until it leaves or the server shuts down. The error says why the
/// connection ended badly (for the log).
pub async fn serve(stream: Box<dyn Io>, sh: Arc<Shared>) -> Result<(), String> {
    let limit = sh.handshake_limit;
    let mut shutdown = sh.shutdown.clone();
    let neg = tokio::select! {
        r = tokio::time::timeout(limit, negotiate(stream, &sh)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(format!("handshake not finished within {limit:?}")),
        },
        _ = shutdown.wait_for(|&s| s) => return Ok(()),
    };
    let Some((stream, neg)) = neg else {
        return Ok(());
    };
    transmission(stream, neg, sh).await
}

async fn negotiate(
    mut s: Box<dyn Io>,
    sh: &Shared,
) -> Result<Option<(Box<dyn Io>, Negotiated)>, String> {
    let e = |e: std::io::Error| format!("handshake: {e}");
    s.write_all(&greeting()).await.map_err(e)?;
    s.flush().await.map_err(e)?;
    let mut hs = Handshake::new(sh.info.clone());
    let flags = s.read_u32().await.map_err(e)?;
    hs.client_flags(flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.map_err(e)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        if magic != IHAVEOPT {
            return Err(format!("bad option magic {magic:#x}"));
        }
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if len > MAX_OPTION {
            if len > MAX_OPTION_DISCARD {
                return Err(format!("option data of {len} bytes"));
            }
            tokio::io::copy(&mut (&mut s).take(len as u64), &mut tokio::io::sink())
                .await
                .map_err(e)?;
            let r = crate::handshake::opt_reply(opt, REP_ERR_TOO_BIG, b"option data too large");
            s.write_all(&r).await.map_err(e)?;
            s.flush().await.map_err(e)?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.map_err(e)?;
        match hs.option(opt, &data) {
            Step::Reply(r) => {
                s.write_all(&r).await.map_err(e)?;
                s.flush().await.map_err(e)?;
            }
            Step::StartTls(r) => {
                s.write_all(&r).await.map_err(e)?;
                s.flush().await.map_err(e)?;
                let Some(acc) = &sh.tls else {
                    return Err("STARTTLS without TLS configured".into());
                };
                let t = acc
                    .accept(s)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                s = Box::new(t);
                hs.tls_started();
            }
            Step::Transmission(r, neg) => {
                s.write_all(&r).await.map_err(e)?;
                s.flush().await.map_err(e)?;
                return Ok(Some((s, neg)));
            }
            Step::Close(r) => {
                let _ = s.write_all(&r).await;
                let _ = s.shutdown().await;
                return Ok(None);
            }
        }
    }
}

/// Per-connection state a request needs.
struct Ctx {
    export: Arc<Export>,
    mode: ReplyMode,
    contexts: Vec<u32>,
    pool: Arc<Pool>,
}

/// A reply: its parts, written one after the other.
type Msg = Vec<Part>;

/// Part of a reply.
enum Part {
    /// Headers, error messages, block status chunks.
    Bytes(Vec<u8>),
    /// Data in a pooled buffer.
    Data(Buf),
}

impl Part {
    fn as_slice(&self) -> &[u8] {
        match self {
            Part::Bytes(v) => v,
            Part::Data(b) => b,
        }
    }
}

impl From<Vec<u8>> for Part {
    fn from(v: Vec<u8>) -> Part {
        Part::Bytes(v)
    }
}

/// The first `len` bytes of a buffer from a [`Pool`]; the buffer is never shorter than
/// `len` and all of it is initialized (so it can be handed out again without zeroing).
struct Buf {
    v: Vec<u8>,
    len: usize,
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[..self.len]
    }
}

/// Smallest pooled buffer (smaller requests get one of this size).
const POOL_MIN_SHIFT: u32 = 12;
/// Size classes: powers of two from 4 KiB to `MAX_PAYLOAD`.
const POOL_CLASSES: usize = (MAX_PAYLOAD.trailing_zeros() - POOL_MIN_SHIFT + 1) as usize;
/// Bytes of free buffers a connection keeps for reuse.
const POOL_KEEP: usize = 16 << 20;

/// Free data buffers of one connection, by power-of-two size class. Taking a buffer
/// from the pool costs no allocation and no zeroing: a fresh `vec![0; n]` for every
/// 256 KiB read reply cost a memset (or page faults) of the whole buffer, 10-15% of
/// the server's time under `nbdcopy`.
struct Pool {
    free: Mutex<(Vec<Vec<Vec<u8>>>, usize)>,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            free: Mutex::new(((0..POOL_CLASSES).map(|_| Vec::new()).collect(), 0)),
        }
    }

    fn class(len: usize) -> usize {
        let c = len.max(1 << POOL_MIN_SHIFT).next_power_of_two();
        (c.trailing_zeros() - POOL_MIN_SHIFT) as usize
    }

    /// A buffer of `len` bytes (at most `MAX_PAYLOAD`), with unspecified contents.
    fn take(&self, len: usize) -> Buf {
        let c = Self::class(len);
        if c < POOL_CLASSES {
            let mut f = self.free.lock().unwrap();
            if let Some(v) = f.0[c].pop() {
                f.1 -= v.len();
                return Buf { v, len };
            }
            drop(f);
            return Buf {
                v: vec![0u8; 1 << (c as u32 + POOL_MIN_SHIFT)],
                len,
            };
        }
        Buf {
            v: vec![0u8; len],
            len,
        }
    }

    /// Give a buffer back (dropped when the pool holds enough).
    fn put(&self, b: Buf) {
        let n = b.v.len();
        let c = Self::class(n);
        if c >= POOL_CLASSES || n != 1 << (c as u32 + POOL_MIN_SHIFT) {
            return;
        }
        let mut f = self.free.lock().unwrap();
        if f.1 + n <= POOL_KEEP {
            f.1 += n;
            f.0[c].push(b.v);
        }
    }
}

/// A reply and the share of the connection's budget it holds until it is written, so a
/// client that sends requests without reading the replies cannot make the server queue
/// unbounded memory.
type Out = (Msg, Option<OwnedSemaphorePermit>);

/// Replies gathered into one batch of writes while the socket is busy.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_REPLIES: usize = 256;
/// Slices per vectored write.
const MAX_IOV: usize = 64;

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    pool: Arc<Pool>,
) {
    let mut batch: Vec<Out> = Vec::new();
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            let size = |m: &Out| m.0.iter().map(|p| p.as_slice().len()).sum::<usize>();
            let mut bytes = size(&m);
            batch.push(m);
            while bytes < BATCH_BYTES && batch.len() < BATCH_REPLIES {
                match rx.try_recv() {
                    Ok(m) => {
                        bytes += size(&m);
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            if write_parts(&mut w, &batch).await.is_err() {
                break 'outer;
            }
            for (m, _permit) in batch.drain(..) {
                for p in m {
                    if let Part::Data(b) = p {
                        pool.put(b);
                    }
                }
            }
            // Replies that came in while this batch was written go out without a flush.
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// Write every part of every reply of `batch`, in order, with vectored writes.
async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Out]) -> std::io::Result<()> {
    let parts: Vec<&[u8]> = (batch.iter().flat_map(|(m, _)| m.iter()))
        .map(Part::as_slice)
        .filter(|p| !p.is_empty())
        .collect();
    // Next part to write, and how much of it is written.
    let (mut i, mut done) = (0, 0);
    while i < parts.len() {
        let iov: Vec<IoSlice> = std::iter::once(&parts[i][done..])
            .chain(parts[i + 1..].iter().copied())
            .take(MAX_IOV)
            .map(IoSlice::new)
            .collect();
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = parts[i].len() - done;
            if n < left {
                done += n;
                break;
            }
            n -= left;
            i += 1;
            done = 0;
        }
    }
    Ok(())
}

/// The transmission phase. A Unix or TCP socket is split into owned halves, which need no
/// lock between the reader and the writer (`tokio::io::split`'s lock showed as 6% of the
/// server's context switches on 4 KiB writes); TLS streams share one state and are split
/// with that lock.
async fn transmission(stream: Box<dyn Io>, neg: Negotiated, sh: Arc<Shared>) -> Result<(), String> {
    let stream = match take_socket::<tokio::net::UnixStream>(stream) {
        Ok(s) => {
            let (rd, wr) = s.into_split();
            return transmission_on(rd, wr, neg, sh).await;
        }
        Err(s) => s,
    };
    let stream = match take_socket::<tokio::net::TcpStream>(stream) {
        Ok(s) => {
            let (rd, wr) = s.into_split();
            return transmission_on(rd, wr, neg, sh).await;
        }
        Err(s) => s,
    };
    let (rd, wr) = tokio::io::split(stream);
    transmission_on(rd, wr, neg, sh).await
}

async fn transmission_on<R, W>(rd: R, wr: W, neg: Negotiated, sh: Arc<Shared>) -> Result<(), String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let pool = Arc::new(Pool::new());
    let writer = tokio::spawn(writer(wr, rx, pool.clone()));
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mode = if neg.extended {
        ReplyMode::Extended
    } else if neg.structured {
        ReplyMode::Structured
    } else {
        ReplyMode::Simple
    };
    let lim = Limits {
        size: sh.export.size(),
        read_only: !sh.export.writable(),
        structured: neg.structured,
        extended: neg.extended,
        contexts: neg.contexts.len(),
        context_mask: neg
            .contexts
            .iter()
            .filter(|&&id| id < 64)
            .fold(0, |m, &id| m | 1 << id),
        min_block: if neg.block_size_agreed {
            sh.info.min_block
        } else {
            1
        },
    };
    let ctx = Arc::new(Ctx {
        export: sh.export.clone(),
        mode,
        contexts: neg.contexts.clone(),
        pool,
    });
    let budget = Arc::new(Semaphore::new(BUDGET as usize));
    let mut tasks = JoinSet::new();
    let mut shutdown = sh.shutdown.clone();
    let hlen = if neg.extended {
        EXT_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut result = Ok(());
    loop {
        let mut hb = [0u8; EXT_REQUEST_LEN];
        let r = tokio::select! {
            r = rd.read_exact(&mut hb[..hlen]) => r,
            _ = shutdown.wait_for(|&s| s) => break,
            _ = tx.closed() => break,
        };
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                result = Err(format!("reading a request: {e}"));
            }
            break;
        }
        let h = match parse_request_header(&hb[..hlen], neg.extended) {
            Ok(h) => h,
            Err(e) => {
                result = Err(e.0);
                break;
            }
        };
        let bytes = if h.typ == CMD_READ {
            h.length.min(MAX_PAYLOAD as u64)
        } else {
            h.payload
        };
        let cost = (1 + bytes.div_ceil(UNIT)) as u32;
        let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
            break;
        };
        let mut payload = Buf {
            v: Vec::new(),
            len: 0,
        };
        if h.payload > 0 {
            payload = ctx.pool.take(h.payload as usize);
            if let Err(e) = rd.read_exact(&mut payload).await {
                result = Err(format!("reading a request payload: {e}"));
                break;
            }
        }
        match validate(&h, &payload, &lim) {
            Err(r) => {
                let reply = vec![error_reply(mode, h.cookie, h.offset, r.errno, &r.msg).into()];
                ctx.pool.put(payload);
                let _ = tx.send((reply, Some(permit)));
            }
            Ok(Command::Disc) => break,
            Ok(cmd) => {
                let inline = matches!(cmd, Command::Read { len, .. } if len <= INLINE_READ_MAX);
                let ctx = ctx.clone();
                let tx = tx.clone();
                // Boxed: the request's future (the engine's whole call chain) is large, and
                // a task would copy it into its cell and again on completion.
                let mut req: Request = Box::pin(async move {
                    let reply = run(&ctx, &h, cmd, payload).await;
                    let _ = tx.send((reply, Some(permit)));
                });
                // A small read is polled once here: served from the page cache, it is done in
                // that poll and needs no task of its own (no spawn, and no other worker woken to
                // steal it). One that waits for the disk goes on as a task. Larger reads are
                // tasks from the start, so that their copies can run on other workers.
                if !inline || poll_once(req.as_mut()).await.is_pending() {
                    tasks.spawn(req);
                }
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    // Finish what is in flight (its replies go out if the client is still there).
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    result
}

/// Reads up to this size are tried on the reader task first (see `transmission_on`).
const INLINE_READ_MAX: u64 = 64 << 10;

/// A request being served, replying through the writer when done.
type Request = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Poll `f` once, with the calling task's context.
async fn poll_once(
    mut f: std::pin::Pin<&mut (dyn std::future::Future<Output = ()> + Send)>,
) -> std::task::Poll<()> {
    std::future::poll_fn(move |cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
}

async fn run(ctx: &Ctx, h: &RequestHeader, cmd: Command, payload: Buf) -> Msg {
    let mode = ctx.mode;
    let ex = &ctx.export;
    let done = |r: Result<(), OpError>| match r {
        Ok(()) => vec![ok_reply(mode, h.cookie, h.offset).into()],
        Err(e) => vec![error_reply(mode, h.cookie, h.offset, e.errno, &e.msg).into()],
    };
    match cmd {
        Command::Read { off, len, df } => match read(ctx, h, off, len, df).await {
            Ok(m) => m,
            Err(e) => vec![error_reply(mode, h.cookie, h.offset, e.errno, &e.msg).into()],
        },
        Command::Write { off, fua, .. } => {
            let r = ex.write(&payload, off, fua).await;
            ctx.pool.put(payload);
            done(r)
        }
        Command::Flush => done(ex.flush().await),
        Command::Trim { off, len, fua } => done(ex.trim(off, len, fua).await),
        Command::WriteZeroes {
            off,
            len,
            fua,
            no_hole,
            fast,
        } => {
            if fast && !ex.fast_zero_possible(off, len) {
                done(Err(OpError {
                    errno: proto::ENOTSUP,
                    msg: "zeroing this range would write data".into(),
                }))
            } else {
                done(ex.write_zeroes(off, len, no_hole, fua).await)
            }
        }
        Command::Cache { off, len } => {
            // Warm the metadata and the host cache for (at most) the first 32 MiB.
            let len = len.min(MAX_PAYLOAD as u64);
            let mut buf = vec![0u8; len.min(1 << 20) as usize];
            let mut pos = off;
            let mut r = Ok(());
            while pos < off + len {
                let n = (off + len - pos).min(buf.len() as u64) as usize;
                if let Err(e) = ex.read(&mut buf[..n], pos).await {
                    r = Err(e);
                    break;
                }
                pos += n as u64;
            }
            done(r)
        }
        Command::BlockStatus {
            off,
            len,
            req_one,
            contexts,
        } => match block_status(ctx, h, off, len, req_one, contexts).await {
            Ok(m) => m.into_iter().map(Part::Bytes).collect(),
            Err(e) => vec![error_reply(mode, h.cookie, h.offset, e.errno, &e.msg).into()],
        },
        Command::Disc => Vec::new(),
    }
}

/// Reads smaller than this are sent as one data chunk without looking for holes.
const SPARSE_READ_MIN: u64 = 64 << 10;

async fn read(ctx: &Ctx, h: &RequestHeader, off: u64, len: u64, df: bool) -> Result<Msg, OpError> {
    let ex = &ctx.export;
    let mode = ctx.mode;
    if mode == ReplyMode::Simple {
        let mut data = ctx.pool.take(len as usize);
        if let Err(e) = ex.read(&mut data, off).await {
            ctx.pool.put(data);
            return Err(e);
        }
        return Ok(vec![simple_reply(h.cookie, 0).into(), Part::Data(data)]);
    }
    // Segments (zero?, offset, length) covering the request.
    let mut segs: Vec<(bool, u64, u64)> = Vec::new();
    if df || len < SPARSE_READ_MIN {
        segs.push((false, off, len));
    } else {
        let runs = ex.status(off, len, 1024, true, false).await?;
        let mut pos = off;
        for r in runs {
            if pos >= off + len {
                break;
            }
            let n = r.len.min(off + len - pos);
            match segs.last_mut() {
                Some(l) if l.0 == r.zero => l.2 += n,
                _ => segs.push((r.zero, pos, n)),
            }
            pos += n;
        }
        if pos < off + len {
            match segs.last_mut() {
                Some(l) if !l.0 => l.2 += off + len - pos,
                _ => segs.push((false, pos, off + len - pos)),
            }
        }
    }
    if len == 0 {
        return Ok(vec![chunk_header(
            mode,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            h.cookie,
            h.offset,
            0,
        )
        .into()]);
    }
    let mut msg = Vec::with_capacity(2 * segs.len());
    let last = segs.len() - 1;
    for (i, &(zero, o, n)) in segs.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if zero {
            let mut c = chunk_header(mode, flags, REPLY_TYPE_OFFSET_HOLE, h.cookie, h.offset, 12);
            c.extend_from_slice(&o.to_be_bytes());
            c.extend_from_slice(&(n as u32).to_be_bytes());
            msg.push(c.into());
        } else {
            let mut data = ctx.pool.take(n as usize);
            if let Err(e) = ex.read(&mut data, o).await {
                ctx.pool.put(data);
                return Err(e);
            }
            // The chunk header and the data's offset, then the data.
            let mut c = chunk_header(
                mode,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                h.cookie,
                h.offset,
                8 + n,
            );
            c.extend_from_slice(&o.to_be_bytes());
            msg.push(c.into());
            msg.push(Part::Data(data));
        }
    }
    Ok(msg)
}

async fn block_status(
    ctx: &Ctx,
    h: &RequestHeader,
    off: u64,
    len: u64,
    req_one: bool,
    wanted: u64,
) -> Result<Vec<Vec<u8>>, OpError> {
    let ex = &ctx.export;
    let mode = ctx.mode;
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let ids: Vec<u32> = (ctx.contexts.iter().copied())
        .filter(|&id| id < 64 && wanted & (1 << id) != 0)
        .filter(|&id| {
            id < CTX_DIRTY_BITMAP || ((id - CTX_DIRTY_BITMAP) as usize) < ex.bitmaps.len()
        })
        .collect();
    // The qcow2 mapping, only when an allocation context is asked for.
    let alloc = ids.contains(&CTX_BASE_ALLOCATION);
    let depth = ids.contains(&CTX_ALLOCATION_DEPTH);
    let runs = if alloc || depth {
        ex.status(off, len, max, alloc, depth).await?
    } else {
        Vec::new()
    };
    let mut max_len = if mode == ReplyMode::Extended {
        u64::MAX
    } else {
        0xffff_f000
    };
    if req_one {
        max_len = max_len.min(len);
    }
    let end = off.saturating_add(len).min(ex.size());
    let mut msg = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let ext = match id {
            CTX_BASE_ALLOCATION => extents(
                &runs,
                |s| (if s.hole { STATE_HOLE } else { 0 }) | (if s.zero { STATE_ZERO } else { 0 }),
                max_len,
                max,
            ),
            CTX_ALLOCATION_DEPTH => extents(&runs, |s| s.depth, max_len, max),
            _ => {
                let b = &ex.bitmaps[(id - CTX_DIRTY_BITMAP) as usize];
                bitmap_extents(&ex.bitmap_runs(b, off, end, max).await?, max_len, max)
            }
        };
        let flags = if i + 1 == ids.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        msg.push(block_status_chunk(
            mode, flags, h.cookie, h.offset, id, &ext,
        ));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_split_into_owned_halves() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let s: Box<dyn Io> = Box::new(a);
        let s = take_socket::<tokio::net::TcpStream>(s).err().unwrap();
        assert!(take_socket::<tokio::net::UnixStream>(s).is_ok());
        let (d, _e) = tokio::io::duplex(64);
        assert!(take_socket::<tokio::net::UnixStream>(Box::new(d)).is_err());
    }
}
