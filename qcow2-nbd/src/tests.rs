//! In-process tests of the whole server over a Unix socket with a hand-written client: simple
//! replies (as the kernel's nbd-client uses them) and extended headers, which the packaged
//! libnbd does not speak.

use crate::conn::Shared;
use crate::export::Export;
use crate::handshake::{ExportInfo, CTX_ALLOCATION_DEPTH};
use crate::proto::*;
use crate::server::{self, Listen, Listener};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SIZE: u64 = 1 << 20;

async fn start(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
    let mut opts = qcow2_core::OpenOptions::default();
    opts.writable = true;
    let disk = qcow2_core::Disk::open(&img, Some(qcow2_core::Format::Raw), &opts)
        .await
        .unwrap();
    let export = Arc::new(Export::new(disk, true));
    let sock = dir.join("s.sock");
    let listener = Listener::bind(&Listen::Unix(sock.clone())).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        export,
        info: ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: SIZE,
            read_only: false,
            min_block: 1,
            pref_block: 4096,
            tls: false,
            multi_conn: true,
            bitmaps: Vec::new(),
        },
        tls: None,
        shutdown: rx,
        handshake_limit: Duration::from_secs(5),
    });
    let opts = server::Options {
        persistent: true,
        shared: 0,
        verbose: false,
    };
    let h = tokio::spawn(server::run(listener, shared, opts, tx.clone()));
    (sock, tx, h)
}

async fn hello(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await
        .unwrap();
}

async fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// Option replies: (type, data) of each.
type OptReplies = Vec<(u32, Vec<u8>)>;

/// Read option replies up to the final one.
async fn replies(s: &mut UnixStream) -> OptReplies {
    let mut out = Vec::new();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let _opt = s.read_u32().await.unwrap();
        let typ = s.read_u32().await.unwrap();
        let n = s.read_u32().await.unwrap();
        let mut d = vec![0u8; n as usize];
        s.read_exact(&mut d).await.unwrap();
        let last = typ == REP_ACK || typ & 0x8000_0000 != 0;
        out.push((typ, d));
        if last {
            return out;
        }
    }
}

/// Connect and negotiate extended headers, then (with `meta`) select that meta context, then
/// GO to export "disk". Returns the stream, the replies to SET_META_CONTEXT (empty without
/// `meta`) and the replies to GO.
async fn extended_session(
    sock: &std::path::Path,
    meta: Option<&str>,
) -> (UnixStream, OptReplies, OptReplies) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    hello(&mut s).await;
    option(&mut s, OPT_EXTENDED_HEADERS, &[]).await;
    assert_eq!(replies(&mut s).await[0].0, REP_ACK);
    let mut meta_replies = Vec::new();
    if let Some(name) = meta {
        let mut q = 4u32.to_be_bytes().to_vec();
        q.extend_from_slice(b"disk");
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(name.len() as u32).to_be_bytes());
        q.extend_from_slice(name.as_bytes());
        option(&mut s, OPT_SET_META_CONTEXT, &q).await;
        meta_replies = replies(&mut s).await;
    }
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, OPT_GO, &go).await;
    let go_replies = replies(&mut s).await;
    assert_eq!(go_replies.last().unwrap().0, REP_ACK);
    (s, meta_replies, go_replies)
}

async fn ext_reply(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    assert_eq!(s.read_u32().await.unwrap(), EXT_REPLY_MAGIC);
    let flags = s.read_u16().await.unwrap();
    let typ = s.read_u16().await.unwrap();
    let cookie = s.read_u64().await.unwrap();
    let _off = s.read_u64().await.unwrap();
    let n = s.read_u64().await.unwrap();
    let mut d = vec![0u8; n as usize];
    s.read_exact(&mut d).await.unwrap();
    (flags, typ, cookie, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_and_extended_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, stop, server) = start(dir.path()).await;

    // Oldest client style: EXPORT_NAME, simple replies.
    let mut s = UnixStream::connect(&sock).await.unwrap();
    hello(&mut s).await;
    option(&mut s, OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(s.read_u64().await.unwrap(), SIZE);
    let flags = s.read_u16().await.unwrap();
    assert!(flags & TF_SEND_FLUSH != 0 && flags & TF_SEND_DF == 0);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&encode_request(CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 8192))
        .await
        .unwrap();
    s.write_all(&data).await.unwrap();
    // The server may run requests in any order (NBD leaves ordering to the
    // client), so the read of the same range waits for the write's reply.
    assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    assert_eq!(s.read_u32().await.unwrap(), 0, "FUA write");
    assert_eq!(s.read_u64().await.unwrap(), 1);
    s.write_all(&encode_request(0, CMD_READ, 2, 4096, 8192))
        .await
        .unwrap();
    s.write_all(&encode_request(0, CMD_READ, 3, SIZE, 1))
        .await
        .unwrap();
    s.write_all(&encode_request(0, CMD_FLUSH, 4, 0, 0))
        .await
        .unwrap();
    // Replies come in any order.
    let mut seen = std::collections::HashMap::new();
    for _ in 0..3 {
        assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let err = s.read_u32().await.unwrap();
        let cookie = s.read_u64().await.unwrap();
        if cookie == 2 && err == 0 {
            let mut b = vec![0u8; 8192];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(b, data);
        }
        seen.insert(cookie, err);
    }
    assert_eq!(seen[&2], 0);
    assert_eq!(seen[&3], EINVAL);
    assert_eq!(seen[&4], 0);
    s.write_all(&encode_request(0, CMD_DISC, 5, 0, 0))
        .await
        .unwrap();
    assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0, "closed after DISC");

    // Extended headers, block status with 64-bit extents.
    let (mut s, m, r) = extended_session(&sock, Some("base:allocation")).await;
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].0, REP_META_CONTEXT);
    let ctx = u32::from_be_bytes(m[0].1[..4].try_into().unwrap());
    let export = r.iter().find(|(t, d)| *t == REP_INFO && d[..2] == [0, 0]);
    let tflags = u16::from_be_bytes(export.unwrap().1[10..12].try_into().unwrap());
    assert!(tflags & TF_BLOCK_STATUS_PAYLOAD != 0, "flags {tflags:#x}");
    s.write_all(&encode_ext_request(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE,
        10,
        65536,
        512,
    ))
    .await
    .unwrap();
    s.write_all(&[0xaa; 512]).await.unwrap();
    let (f, t, c, _) = ext_reply(&mut s).await;
    assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 10));
    s.write_all(&encode_ext_request(0, CMD_BLOCK_STATUS, 11, 0, SIZE))
        .await
        .unwrap();
    let (f, t, c, d) = ext_reply(&mut s).await;
    assert_eq!(
        (f, t, c),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 11)
    );
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), ctx);
    let count = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(d.len(), 8 + 16 * count);
    let total: u64 = (0..count)
        .map(|i| u64::from_be_bytes(d[8 + 16 * i..16 + 16 * i].try_into().unwrap()))
        .sum();
    assert_eq!(total, SIZE);
    // The payload form: effect length and the contexts wanted.
    let status = |cookie: u64, payload: Vec<u8>| {
        let mut v = encode_ext_request(
            CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE,
            CMD_BLOCK_STATUS,
            cookie,
            0,
            payload.len() as u64,
        );
        v.extend(payload);
        v
    };
    let ids = |len: u64, ids: &[u32]| {
        let mut p = len.to_be_bytes().to_vec();
        ids.iter()
            .for_each(|i| p.extend_from_slice(&i.to_be_bytes()));
        p
    };
    s.write_all(&status(20, ids(4096, &[ctx]))).await.unwrap();
    let (f, t, c, d) = ext_reply(&mut s).await;
    assert_eq!(
        (f, t, c),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 20)
    );
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), ctx);
    assert_eq!(
        u32::from_be_bytes(d[4..8].try_into().unwrap()),
        1,
        "REQ_ONE"
    );
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 4096);
    // Unknown (not selected) or repeated ids, a malformed payload, an effect length past
    // the end: EINVAL, and the connection goes on.
    for (cookie, p) in [
        (21, ids(4096, &[CTX_ALLOCATION_DEPTH])),
        (22, ids(4096, &[ctx, ctx])),
        (23, ids(4096, &[])),
        (24, vec![0u8; 10]),
        (25, ids(SIZE + 1, &[ctx])),
        (26, ids(0, &[ctx])),
    ] {
        s.write_all(&status(cookie, p)).await.unwrap();
        let (f, t, c, d) = ext_reply(&mut s).await;
        assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie));
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), EINVAL);
    }
    // A 64-bit effect length past the end is refused with an error chunk.
    s.write_all(&encode_ext_request(0, CMD_READ, 12, 0, 1 << 40))
        .await
        .unwrap();
    let (_, t, c, d) = ext_reply(&mut s).await;
    assert_eq!((t, c), (REPLY_TYPE_ERROR, 12));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), EOVERFLOW);
    s.write_all(&encode_ext_request(0, CMD_READ, 13, 65536, 512))
        .await
        .unwrap();
    let (f, t, c, d) = ext_reply(&mut s).await;
    assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 13));
    assert_eq!(&d[8..], &[0xaa; 512][..]);
    drop(s);

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!sock.exists());
}

/// Many large reads in flight while the client reads nothing: the replies back up in the
/// socket, so the writer's vectored writes end part-way through replies and go on from
/// there; the data buffers come back from the pool for the next round (other lengths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_large_reads_through_a_full_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, stop, server) = start(dir.path()).await;
    let (mut s, _, _) = extended_session(&sock, None).await;

    // Every byte differs from its neighbours' and from other offsets' modulo 251.
    let content: Vec<u8> = (0..SIZE)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    for (i, chunk) in content.chunks(256 << 10).enumerate() {
        let off = i as u64 * (256 << 10);
        let n = chunk.len() as u64;
        let v = encode_ext_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 100 + i as u64, off, n);
        s.write_all(&v).await.unwrap();
        s.write_all(chunk).await.unwrap();
    }
    for _ in 0..4 {
        let (_, t, _, _) = ext_reply(&mut s).await;
        assert_eq!(t, REPLY_TYPE_NONE);
    }
    for round in 0..3u64 {
        // Reads of 64 KiB to 256 KiB + 3 bytes at odd offsets; 24 of them is well past
        // what the socket holds before the client reads.
        let mut want = std::collections::HashMap::new();
        for i in 0..24u64 {
            let len = (64 << 10) + ((i * 37 + round * 101) % 4) * (64 << 10) + round;
            let off = (i * 40_961 + round * 7) % (SIZE - len);
            let cookie = round * 1000 + i;
            s.write_all(&encode_ext_request(0, CMD_READ, cookie, off, len))
                .await
                .unwrap();
            want.insert(cookie, (off, len));
        }
        for _ in 0..want.len() {
            let r = tokio::time::timeout(Duration::from_secs(20), ext_reply(&mut s)).await;
            let (f, t, c, d) = r.expect("a reply within 20 s");
            assert_eq!(
                (f, t),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA),
                "cookie {c}"
            );
            let (off, len) = want.remove(&c).expect("a cookie sent once");
            assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), off);
            assert_eq!(d.len() as u64, 8 + len);
            assert!(
                d[8..] == content[off as usize..(off + len) as usize],
                "data of cookie {c} ({len} bytes at {off})"
            );
        }
    }
    drop(s);
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
