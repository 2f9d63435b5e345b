//! Byte surgery on qcow2 files for the `check_*` tests: a whole image in memory with accessors
//! for the header, refcounts and L2 entries, a small deterministic generator, and an image made
//! by qemu-img with most kinds of structure to damage.
#![allow(dead_code)]

use crate::common::{p, run};
use std::path::{Path, PathBuf};

/// A qcow2 file's bytes, edited in memory and written back with [`Raw::save`].
pub struct Raw {
    pub path: PathBuf,
    pub b: Vec<u8>,
}

impl Raw {
    pub fn load(path: &Path) -> Raw {
        Raw {
            path: path.to_path_buf(),
            b: std::fs::read(path).unwrap(),
        }
    }
    pub fn save(&self) {
        std::fs::write(&self.path, &self.b).unwrap();
    }
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.b[off..off + 4].try_into().unwrap())
    }
    pub fn u64(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.b[off..off + 8].try_into().unwrap())
    }
    pub fn put64(&mut self, off: usize, v: u64) {
        self.b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    pub fn cluster_bits(&self) -> u32 {
        self.u32(20)
    }
    pub fn cs(&self) -> u64 {
        1 << self.cluster_bits()
    }
    /// Clusters in the file, the last one partial or not.
    pub fn clusters(&self) -> u64 {
        (self.b.len() as u64).div_ceil(self.cs())
    }
    pub fn refcount_order(&self) -> u32 {
        if self.u32(4) >= 3 {
            self.u32(96)
        } else {
            4
        }
    }
    /// Byte offset of the refcount entry of cluster `ci` (16-bit refcounts only), if its
    /// refcount block exists.
    pub fn refcount_pos(&self, ci: u64) -> Option<usize> {
        assert_eq!(
            self.refcount_order(),
            4,
            "surgery helpers handle 16-bit refcounts only"
        );
        let rb_entries = self.cs() / 2;
        let rt = self.u64(48) as usize;
        let rb = self.u64(rt + (ci / rb_entries) as usize * 8) & !511;
        (rb != 0).then(|| rb as usize + (ci % rb_entries) as usize * 2)
    }
    fn refcount_pos_of(&self, ci: u64) -> usize {
        self.refcount_pos(ci)
            .unwrap_or_else(|| panic!("no refcount block for cluster {ci}"))
    }
    pub fn refcount(&self, ci: u64) -> u16 {
        let p = self.refcount_pos_of(ci);
        u16::from_be_bytes([self.b[p], self.b[p + 1]])
    }
    pub fn set_refcount(&mut self, ci: u64, v: u16) {
        let p = self.refcount_pos_of(ci);
        self.b[p..p + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// Byte offset of the active L2 entry of guest cluster `gc` (standard 8-byte entries).
    pub fn l2_entry_pos(&self, gc: u64) -> usize {
        let l2_entries = self.cs() / 8;
        let l1 = self.u64(40) as usize;
        let l2 = self.u64(l1 + (gc / l2_entries) as usize * 8) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "guest cluster {gc} has no L2 table");
        l2 as usize + (gc % l2_entries) as usize * 8
    }
    /// Host cluster of guest cluster `gc`.
    pub fn host_cluster(&self, gc: u64) -> u64 {
        (self.u64(self.l2_entry_pos(gc)) & 0x00ff_ffff_ffff_fe00) / self.cs()
    }
}

/// Deterministic xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Run qemu-io commands on an image (which must succeed; their output is not checked).
pub fn io(path: &Path, cmds: &[&str]) {
    let mut args = vec![];
    for c in cmds {
        args.extend(["-c", *c]);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

/// An 8 MiB image made by qemu-img with compressed (straddling host clusters), zero and
/// normal clusters, and optionally an internal snapshot `s1` and a bitmap `b0`, with guest
/// writes after each.
pub fn rich_image(dir: &Path, cluster_size: &str, snapshot: bool, bitmap: bool) -> PathBuf {
    let raw = dir.join("rich-src.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "8M"]);
    let mut rng = Rng(0x1234_5678);
    let mut f = std::fs::read(&raw).unwrap();
    // Half-compressible data so compressed clusters straddle host clusters.
    for (i, b) in f[..3 << 20].iter_mut().enumerate() {
        *b = if i % 512 < 200 {
            rng.next() as u8
        } else {
            (i / 4096) as u8
        };
    }
    std::fs::write(&raw, &f).unwrap();
    let img = dir.join(format!("rich-{cluster_size}.qcow2"));
    let cs = format!("cluster_size={cluster_size}");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "-o", &cs, p(&raw), p(&img)],
    );
    io(&img, &["write -P 1 4M 256k", "write -z 5M 64k"]);
    if snapshot {
        run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    }
    io(&img, &["write -P 2 0 64k", "write -P 3 6M 128k"]);
    if bitmap {
        run("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
        io(&img, &["write -P 4 7M 64k"]);
    }
    img
}
