//! `info`: what qemu-img info reports, as JSON (qemu-img's keys) and as text.

use crate::engine::disk::{Disk, MapEntry};
use crate::engine::image::BitmapInfo;
use crate::format::snapshot::Snapshot;
use crate::Result;
use serde_json::{json, Map, Value};

/// qemu's `size_to_str`: three significant digits and a binary unit ("344 KiB").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0usize;
    // Largest unit where the value stays >= 1000/1024 (as qemu's frexp trick).
    let scaled = val as f64 / (1000.0 / 1024.0);
    if scaled >= 1.0 {
        let bits = scaled.log2().floor() as i32 + 1;
        i = ((bits - 1) / 10).clamp(0, 6) as usize;
    }
    let v = val as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(v), SUFFIXES[i])
}

/// printf's `%0.3g` for values below 1000.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = v.abs().log10().floor() as i32;
    let decimals = (2 - e).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn local_time(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: `tm` is a plain C struct that localtime_r fully initializes on success; we pass
    // valid pointers to local variables that outlive the call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return String::new();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn clock_str(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    let secs = ms / 1000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

/// The snapshot table as `qemu-img snapshot -l` prints it.
pub fn snapshot_table(snaps: &[Snapshot]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            local_time(sn.date_sec),
            clock_str(sn.vm_clock_nsec),
            sn.icount.map(|i| i.to_string()).unwrap_or_default()
        );
    }
    s
}

/// One persistent bitmap as `qemu-img info --output=json` lists it
/// (`format-specific.data.bitmaps` array): `flags` (`in-use`, `auto`), `name`, `granularity`.
pub fn bitmap_json(b: &BitmapInfo) -> Value {
    let mut flags = Vec::new();
    if b.flags & 1 != 0 {
        flags.push("in-use");
    }
    if b.flags & 2 != 0 {
        flags.push("auto");
    }
    json!({"flags": flags, "name": b.name, "granularity": b.granularity})
}

/// One snapshot as `qemu-img info --output=json` lists it (`snapshots` array).
pub fn snapshot_json(sn: &Snapshot) -> Value {
    let mut m = Map::new();
    if let Some(ic) = sn.icount {
        m.insert("icount".into(), json!(ic));
    }
    m.insert(
        "vm-clock-nsec".into(),
        json!(sn.vm_clock_nsec % 1_000_000_000),
    );
    m.insert("name".into(), json!(sn.name));
    m.insert("date-sec".into(), json!(sn.date_sec));
    m.insert("date-nsec".into(), json!(sn.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(sn.vm_clock_nsec / 1_000_000_000),
    );
    m.insert("id".into(), json!(sn.id));
    m.insert("vm-state-size".into(), json!(sn.vm_state_size));
    Value::Object(m)
}

/// The virtual size `info` reports: a raw file's length rounded up to 512 bytes, as QEMU
/// reports it (it sizes block devices in sectors); a qcow2 image's size as it is.
fn reported_size(disk: &Disk) -> u64 {
    match disk {
        Disk::Raw(_) => disk.size().div_ceil(512) * 512,
        Disk::Qcow2(_) => disk.size(),
    }
}

/// `qemu-img info --output=json` for one disk (no chain).
pub fn info_json(disk: &Disk) -> Result<Value> {
    let filename = disk.path().display().to_string();
    let actual = disk.actual_size()?;
    let mut m = Map::new();
    let file_len = match disk {
        Disk::Qcow2(i) => i.storage().len().unwrap_or(0).div_ceil(512) * 512,
        Disk::Raw(_) => reported_size(disk),
    };
    m.insert(
        "children".into(),
        json!([{ "name": "file", "info": {
            "children": [],
            "virtual-size": file_len,
            "filename": filename,
            "format": "file",
            "actual-size": actual,
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false,
        }}]),
    );
    match disk {
        Disk::Raw(_) => {
            m.insert("virtual-size".into(), json!(reported_size(disk)));
            m.insert("filename".into(), json!(filename));
            m.insert("format".into(), json!("raw"));
            m.insert("actual-size".into(), json!(actual));
            m.insert("dirty-flag".into(), json!(false));
        }
        Disk::Qcow2(img) => {
            let h = img.header();
            if h.backing_file.is_some() {
                if let Some(f) = &h.backing_format {
                    m.insert("backing-filename-format".into(), json!(f));
                }
            }
            let snaps = img.snapshots();
            if !snaps.is_empty() {
                m.insert(
                    "snapshots".into(),
                    Value::Array(snaps.iter().map(snapshot_json).collect()),
                );
            }
            m.insert("virtual-size".into(), json!(h.size));
            m.insert("filename".into(), json!(filename));
            m.insert("cluster-size".into(), json!(h.cluster_size()));
            m.insert("format".into(), json!("qcow2"));
            m.insert("actual-size".into(), json!(actual));
            let mut d = Map::new();
            if h.version == 2 {
                d.insert("compat".into(), json!("0.10"));
                d.insert(
                    "compression-type".into(),
                    json!(h.compression_type().name()),
                );
                d.insert("refcount-bits".into(), json!(h.refcount_bits()));
            } else {
                d.insert("compat".into(), json!("1.1"));
                d.insert(
                    "compression-type".into(),
                    json!(h.compression_type().name()),
                );
                d.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
                let bms = img.bitmaps();
                if !bms.is_empty() {
                    let list: Vec<Value> = bms.iter().map(bitmap_json).collect();
                    d.insert("bitmaps".into(), Value::Array(list));
                }
                d.insert("refcount-bits".into(), json!(h.refcount_bits()));
                if h.has_data_file() {
                    if let Some(df) = &h.data_file {
                        d.insert("data-file".into(), json!(df));
                    }
                    d.insert("data-file-raw".into(), json!(h.data_file_raw()));
                }
                d.insert("corrupt".into(), json!(h.corrupt()));
                d.insert("extended-l2".into(), json!(h.extended_l2()));
            }
            m.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": Value::Object(d)}),
            );
            if let Some(b) = &h.backing_file {
                let full = match img.backing() {
                    Some(bd) => bd.path().display().to_string(),
                    None => crate::engine::image::resolve_name(img.path(), b)
                        .display()
                        .to_string(),
                };
                m.insert("full-backing-filename".into(), json!(full));
                m.insert("backing-filename".into(), json!(b));
            }
            m.insert("dirty-flag".into(), json!(h.dirty()));
        }
    }
    Ok(Value::Object(m))
}

/// `qemu-img info` human output for one disk.
pub fn info_human(disk: &Disk) -> Result<String> {
    let mut s = String::new();
    let actual = disk.actual_size()?;
    s += &format!("image: {}\n", disk.path().display());
    s += &format!("file format: {}\n", disk.format().name());
    s += &format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(reported_size(disk)),
        reported_size(disk)
    );
    s += &format!("disk size: {}\n", size_to_str(actual));
    let file_len;
    match disk {
        Disk::Raw(_) => file_len = reported_size(disk),
        Disk::Qcow2(img) => {
            file_len = img.storage().len().unwrap_or(0).div_ceil(512) * 512;
            let h = img.header();
            s += &format!("cluster_size: {}\n", h.cluster_size());
            if let Some(b) = &h.backing_file {
                let full = match img.backing() {
                    Some(bd) => bd.path().display().to_string(),
                    None => crate::engine::image::resolve_name(img.path(), b)
                        .display()
                        .to_string(),
                };
                if &full == b {
                    s += &format!("backing file: {b}\n");
                } else {
                    s += &format!("backing file: {b} (actual path: {full})\n");
                }
                if let Some(f) = &h.backing_format {
                    s += &format!("backing file format: {f}\n");
                }
            }
            if h.dirty() {
                s += "cleanly shut down: no\n";
            }
            let snaps = img.snapshots();
            if !snaps.is_empty() {
                s += &snapshot_table(&snaps);
            }
            s += "Format specific information:\n";
            if h.version == 2 {
                s += "    compat: 0.10\n";
                s += &format!("    compression type: {}\n", h.compression_type().name());
                s += &format!("    refcount bits: {}\n", h.refcount_bits());
            } else {
                s += "    compat: 1.1\n";
                s += &format!("    compression type: {}\n", h.compression_type().name());
                s += &format!("    lazy refcounts: {}\n", h.lazy_refcounts());
                let bms = img.bitmaps();
                if !bms.is_empty() {
                    s += "    bitmaps:\n";
                    for (i, b) in bms.iter().enumerate() {
                        s += &format!("        [{i}]:\n            flags:\n");
                        let mut n = 0;
                        if b.flags & 1 != 0 {
                            s += &format!("                [{n}]: in-use\n");
                            n += 1;
                        }
                        if b.flags & 2 != 0 {
                            s += &format!("                [{n}]: auto\n");
                        }
                        s += &format!(
                            "            name: {}\n            granularity: {}\n",
                            b.name, b.granularity
                        );
                    }
                }
                s += &format!("    refcount bits: {}\n", h.refcount_bits());
                if h.has_data_file() {
                    if let Some(df) = &h.data_file {
                        s += &format!("    data file: {df}\n");
                    }
                    s += &format!("    data file raw: {}\n", h.data_file_raw());
                }
                s += &format!("    corrupt: {}\n", h.corrupt());
                s += &format!("    extended l2: {}\n", h.extended_l2());
            }
        }
    }
    s += "Child node '/file':\n";
    s += &format!("    filename: {}\n", disk.path().display());
    s += "    protocol type: file\n";
    s += &format!(
        "    file length: {} ({} bytes)\n",
        size_to_str(file_len),
        file_len
    );
    s += &format!("    disk size: {}\n", size_to_str(actual));
    Ok(s)
}

/// One entry of `qemu-img map --output=json`: its keys, in its order (`offset` only when the
/// host offset is known).
pub fn map_entry_json(e: &MapEntry) -> Value {
    let mut m = Map::new();
    m.insert("start".into(), json!(e.start));
    m.insert("length".into(), json!(e.length));
    m.insert("depth".into(), json!(e.depth));
    m.insert("present".into(), json!(e.present));
    m.insert("zero".into(), json!(e.zero));
    m.insert("data".into(), json!(e.data));
    m.insert("compressed".into(), json!(e.compressed));
    if let Some(o) = e.offset {
        m.insert("offset".into(), json!(o));
    }
    Value::Object(m)
}

/// One line of `qemu-img map --output=json` (without the separator): `{ "start": ..}`.
pub fn map_json_line(e: &MapEntry) -> String {
    let mut out = String::from("{ ");
    if let Value::Object(m) = map_entry_json(e) {
        let fields: Vec<String> = m.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        out.push_str(&fields.join(", "));
    }
    out.push('}');
    out
}

/// The text of `qemu-img map --output=json`: a JSON array with one entry a line, spaced as
/// qemu-img prints it.
pub fn map_json(entries: &[MapEntry]) -> String {
    let mut out = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&map_json_line(e));
    }
    out.push_str("]\n");
    out
}

/// The disks of the chain, top first.
pub fn chain(disk: &Disk) -> Vec<&Disk> {
    let mut v = vec![disk];
    let mut d = disk;
    while let Some(b) = d.backing() {
        v.push(b);
        d = b;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(352256), "344 KiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(1536 << 20), "1.5 GiB");
        assert_eq!(size_to_str(1 << 40), "1 TiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
    }
}
