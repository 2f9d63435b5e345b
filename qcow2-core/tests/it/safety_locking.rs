//! Image locking against the real QEMU (qemu-io holding an image, qemu-img inspecting ours),
//! and the refusal to overwrite a file the source reads. Needs qemu-img and qemu-io: skipped
//! (with a message) when they are missing, failing in CI.

use crate::common::{have_qemu, qemu_overlay};
use qcow2_core::convert::{self, ConvertOptions, Target};
use qcow2_core::create::{self, CreateOptions};
use qcow2_core::{Disk, ErrorKind, Format, Image, OpenOptions};
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn cmd(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).output().unwrap()
}

fn make(path: &Path) {
    assert!(
        cmd("qemu-img", &["create", "-q", "-f", "qcow2", p(path), "16M"])
            .status
            .success()
    );
    assert!(cmd("qemu-io", &["-c", "write -P 7 0 64k", p(path)])
        .status
        .success());
}

/// `qemu-io -f qcow2 IMG` (writable), kept open by its stdin pipe until killed.
struct QemuIo(Child);
impl QemuIo {
    fn hold(path: &Path) -> QemuIo {
        let q = QemuIo::open(path, false);
        assert!(
            !cmd("qemu-img", &["info", p(path)]).status.success(),
            "qemu-io took no lock"
        );
        q
    }

    /// `qemu-io -r -f qcow2 IMG` (a reader: unshares write and resize).
    fn hold_reader(path: &Path) -> QemuIo {
        let q = QemuIo::open(path, true);
        assert!(
            !cmd("qemu-io", &["-c", "read 0 512", p(path)])
                .status
                .success(),
            "qemu-io took no lock"
        );
        q
    }

    fn open(path: &Path, read_only: bool) -> QemuIo {
        let mut args = vec!["-f", "qcow2", p(path)];
        if read_only {
            args.insert(0, "-r");
        }
        let mut child = Command::new("qemu-io")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until qemu-io has opened the image (and holds its locks) by having it answer a
        // command. Probing with another qemu-io or `qemu-img info` meanwhile raced with
        // qemu-io's own lock check at open (qemu-io then exited: "Failed to get write lock"),
        // and the probe loop timed out under load.
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"read 0 512\n")
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        assert!(
            line.contains("read 512/512"),
            "qemu-io did not open the image: {line:?}"
        );
        QemuIo(child)
    }
}
impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_writer_excludes_us() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("held.qcow2");
    make(&img);
    let holder = QemuIo::hold(&img);
    // Writable open (resize, check -r, a writer): refused like qemu-img resize.
    let mut rw = OpenOptions::default();
    rw.writable = true;
    let e = Image::open(&img, &rw).await.err().expect("writable open");
    assert_eq!(e.kind(), ErrorKind::Locked);
    assert_eq!(e.errno(), libc::EAGAIN);
    assert!(
        e.to_string().contains("Failed to get \"write\" lock"),
        "{e}"
    );
    assert!(
        e.to_string().contains("Is another process using the image")
            || e.to_string().contains("is another process using the image"),
        "{e}"
    );
    // Read-only open: refused, as qemu-img info/check/map do without -U.
    let e = Image::open(&img, &OpenOptions::default())
        .await
        .err()
        .expect("read-only open");
    assert!(
        e.to_string()
            .contains("Failed to get shared \"write\" lock"),
        "{e}"
    );
    // -U: allowed; writable + force-share: refused as by qemu.
    let mut fs = OpenOptions::default();
    fs.force_share = true;
    let i = Image::open(&img, &fs).await.unwrap();
    let mut buf = vec![0u8; 512];
    i.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(buf[0], 7);
    drop(i);
    let e = Image::open(&img, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o.force_share = true;
        o
    })
    .await
    .err()
    .unwrap();
    assert!(e
        .to_string()
        .contains("force-share=on can only be used with read-only images"));
    // Creating over it is refused and leaves it intact.
    let e = create::create_qcow2(
        &img,
        &CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    drop(holder);
    let i = Image::open(&img, &OpenOptions::default()).await.unwrap();
    assert_eq!(i.size(), 16 << 20);
    i.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(buf[0], 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn our_writer_excludes_qemu_and_us() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("ours.qcow2");
    make(&img);
    let mut rw = OpenOptions::default();
    rw.writable = true;
    let w = Image::open(&img, &rw).await.unwrap();
    let out = cmd("qemu-img", &["info", p(&img)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&out)
    );
    assert!(cmd("qemu-img", &["info", "-U", p(&img)]).status.success());
    let out = cmd("qemu-io", &["-c", "read 0 512", p(&img)]);
    assert!(
        stderr(&out).contains("Failed to get \"write\" lock"),
        "qemu-io opened an image we write: {}",
        stderr(&out)
    );
    // A second writer of ours, in the same process, is refused too; a reader as well.
    let e = Image::open(&img, &rw).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Locked);
    assert!(Image::open(&img, &OpenOptions::default()).await.is_err());
    // Clones share the locks; the last one releases them.
    let w2 = w.clone();
    drop(w);
    assert!(!cmd("qemu-img", &["info", p(&img)]).status.success());
    w2.close().await.unwrap();
    let out = cmd("qemu-img", &["info", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Reading backing files locks them as qemu does: no writer while an overlay is open.
    let top = d.path().join("top.qcow2");
    qemu_overlay(&img, &top);
    let o = Image::open(&top, &rw).await.unwrap();
    let out = cmd("qemu-io", &["-c", "read 0 512", p(&img)]);
    assert!(
        stderr(&out).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&out)
    );
    assert!(cmd("qemu-img", &["info", p(&img)]).status.success());
    drop(o);
    // Locking off: no locks at all.
    let mut off = OpenOptions::default();
    off.writable = true;
    off.locking = false;
    let _w = Image::open(&img, &off).await.unwrap();
    assert!(cmd("qemu-img", &["info", p(&img)]).status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn convert_onto_the_source_is_refused() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.qcow2");
    make(&src);
    let keep = d.path().join("keep.qcow2");
    std::fs::copy(&src, &keep).unwrap();
    std::os::unix::fs::symlink(&src, d.path().join("link.qcow2")).unwrap();
    std::fs::hard_link(&src, d.path().join("hard.qcow2")).unwrap();
    let top = d.path().join("top.qcow2");
    assert!(cmd(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            p(&top)
        ]
    )
    .status
    .success());
    let dot = d.path().join(".").join("src.qcow2");
    for (from, to) in [
        (&src, &src),
        (&src, &dot),
        (&src, &d.path().join("link.qcow2")),
        (&src, &d.path().join("hard.qcow2")),
        (&top, &src),
    ] {
        for fmt in [Format::Raw, Format::Qcow2] {
            // Opened with force-share, so that only the identity check can refuse it.
            let disk = Disk::open(from, None, &{
                let mut o = OpenOptions::default();
                o.force_share = true;
                o
            })
            .await
            .unwrap();
            let t = Target {
                format: fmt,
                create: CreateOptions::default(),
                compress: false,
            };
            let e = convert::convert(&disk, to, &t, &ConvertOptions::default())
                .await
                .unwrap_err();
            assert!(
                e.to_string().contains("refusing to overwrite it"),
                "{} -> {}: {e}",
                from.display(),
                to.display()
            );
        }
    }
    let out = cmd("qemu-img", &["compare", p(&keep), p(&src)]);
    assert!(out.status.success(), "the source changed");
}

/// `commit` holds the base (and the image) as a writer, on the chain's own handles, as
/// qemu-img commit does: while it runs, qemu-io and qemu-img without -U are refused on both;
/// a reader holding the base makes the commit fail before any change, with qemu-img's error.
#[tokio::test(flavor = "multi_thread")]
async fn commit_locks_the_base_as_a_writer() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    make(&base);
    qemu_overlay(&base, &top);
    assert!(cmd("qemu-io", &["-c", "write -P 9 0 1M", p(&top)])
        .status
        .success());
    let before = std::fs::read(&base).unwrap();

    // A reader of the base: the commit is refused, as by qemu-img.
    let holder = QemuIo::hold_reader(&base);
    let q = cmd("qemu-img", &["commit", p(&top)]);
    assert!(
        stderr(&q).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&q)
    );
    let e = qcow2_core::commit::commit(&top, &Default::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    assert!(
        e.to_string().contains("Failed to get \"write\" lock"),
        "{e}"
    );
    assert!(e.to_string().contains("base.qcow2"), "{e}");
    drop(holder);
    assert_eq!(std::fs::read(&base).unwrap(), before, "base changed");

    // While the commit runs: the base and the image refuse qemu-io and qemu-img info.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let (b2, t2) = (base.clone(), top.clone());
    let opts = qcow2_core::commit::CommitOptions {
        progress: Some(std::sync::Arc::new(move |f: f64| {
            if f == 0.0 {
                let mut v = s2.lock().unwrap();
                for f in [&b2, &t2] {
                    v.push(stderr(&cmd("qemu-img", &["info", p(f)])));
                    v.push(stderr(&cmd("qemu-io", &["-c", "read 0 512", p(f)])));
                }
                v.push(format!(
                    "{}",
                    cmd("qemu-img", &["info", "-U", p(&b2)]).status.success()
                ));
            }
        })),
        ..Default::default()
    };
    qcow2_core::commit::commit(&top, &opts).await.unwrap();
    let v = seen.lock().unwrap().clone();
    assert_eq!(v.len(), 5, "{v:?}");
    for i in [0, 2] {
        assert!(
            v[i].contains("Failed to get shared \"write\" lock"),
            "{v:?}"
        );
        assert!(v[i + 1].contains("Failed to get \"write\" lock"), "{v:?}");
    }
    assert_eq!(v[4], "true", "{v:?}");
    // Released at the end, and the commit happened.
    let out = cmd("qemu-img", &["info", p(&base)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cmd("qemu-img", &["compare", p(&top), p(&base)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cmd("qemu-img", &["check", p(&base)]);
    assert!(out.status.success(), "{}", stderr(&out));
}
