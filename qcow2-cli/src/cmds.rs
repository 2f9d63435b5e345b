//! The subcommands.

use crate::cli::{self, operands, Cmd, Common};
use crate::Fail;
use qcow2_core::convert::{self, CompareResult, ConvertOptions};
use qcow2_core::create::{self, CreateOptions};
use qcow2_core::disk::Disk;
use qcow2_core::io::EngineKind;
use qcow2_core::{info, CacheMode, Format, OpenOptions};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// Run a parsed command; `m` is its own matches (the bitmap operations' order is read there),
/// `argv` the command line it was parsed from (`serve --fork` runs its arguments again).
pub async fn run(cmd: Cmd, m: Option<&clap::ArgMatches>, argv: &[String]) -> Result<u8, Fail> {
    match cmd {
        Cmd::Info(a) => cmd_info(a).await,
        Cmd::Map(a) => cmd_map(a).await,
        Cmd::Convert(a) => cmd_convert(a).await,
        Cmd::Compare(a) => cmd_compare(a).await,
        Cmd::Snapshot(a) => cmd_snapshot(a).await,
        Cmd::Create(a) => cmd_create(a).await,
        Cmd::Check(a) => cmd_check(a).await,
        Cmd::Resize(a) => cmd_resize(a).await,
        Cmd::Rebase(a) => cmd_rebase(a).await,
        Cmd::Commit(a) => cmd_commit(a).await,
        Cmd::Measure(a) => cmd_measure(a).await,
        Cmd::Amend(a) => cmd_amend(a).await,
        Cmd::Bitmap(a) => {
            let actions = m.map(cli::bitmap_actions).unwrap_or_default();
            cmd_bitmap(a, actions).await
        }
        Cmd::Dd(a) => cmd_dd(a).await,
        Cmd::Dump(a) => crate::dump::cmd_dump(a).await,
        Cmd::Bench(a) => crate::bench::cmd_bench(a).await,
        Cmd::Serve(a) => {
            // The arguments after the command's name (the first "serve": nothing before it
            // takes a value).
            let at = argv
                .iter()
                .position(|s| s == "serve")
                .map_or(argv.len(), |i| i + 1);
            Ok(qcow2_nbd::cli::run(a, &argv[at..]).await)
        }
        Cmd::Completions(_) | Cmd::Manpage(_) => Ok(0),
    }
}

pub(crate) fn open_opts(c: &Common, force_share: bool) -> OpenOptions {
    let mut o = OpenOptions::default();
    o.no_external_files = c.untrusted;
    o.force_share = force_share;
    o
}

fn one_operand(ops: &[String], what: &str) -> Result<String, Fail> {
    match ops {
        [f] => Ok(f.clone()),
        [] => Err(Fail::new(format!("expecting {what}"))),
        _ => Err(Fail::new(format!(
            "too many arguments (expecting one {what})"
        ))),
    }
}

pub(crate) fn output_json(output: Option<&str>) -> Result<bool, Fail> {
    match output {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(o) => Err(Fail::new(format!(
            "--output expects 'human' or 'json' not '{o}'"
        ))),
    }
}

/// Open a disk, prefixing errors with the file name (once).
async fn open(path: &str, fmt: Option<&str>, opts: &OpenOptions) -> Result<Disk, Fail> {
    convert::open_disk(Path::new(path), fmt, opts)
        .await
        .map_err(|e| {
            let m = e.to_string();
            if m.starts_with(path) {
                Fail::new(m)
            } else {
                Fail::new(format!("{path}: {m}"))
            }
        })
}

pub fn print_json(v: &Value) {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(v, &mut ser).expect("JSON serialization of a Value cannot fail");
    out.push(b'\n');
    let _ = std::io::stdout().write_all(&out);
}

/// The read-only commands on one file (`info`, `map`): their file operand opened, and
/// whether `--output` asks for JSON.
async fn open_one(
    file: &Option<String>,
    extra: &[String],
    format: Option<&str>,
    output: Option<&str>,
    common: &Common,
    force_share: bool,
) -> Result<(Disk, bool), Fail> {
    let file = one_operand(&operands(&[file], extra), "a file name")?;
    let json = output_json(output)?;
    let disk = open(&file, format, &open_opts(common, force_share)).await?;
    Ok((disk, json))
}

async fn cmd_info(p: cli::InfoArgs) -> Result<u8, Fail> {
    let (disk, json) = open_one(
        &p.file,
        &p.extra,
        p.format.as_deref(),
        p.output.as_deref(),
        &p.common,
        p.force_share,
    )
    .await?;
    let layers = if p.backing_chain {
        info::chain(&disk)
    } else {
        vec![&disk]
    };
    if json {
        let vals: Vec<Value> = layers
            .iter()
            .map(|d| info::info_json(d))
            .collect::<Result<_, _>>()?;
        if p.backing_chain {
            print_json(&Value::Array(vals));
        } else {
            print_json(&vals[0]);
        }
    } else {
        let mut out = String::new();
        for (i, d) in layers.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out += &info::info_human(d)?;
        }
        print!("{out}");
    }
    Ok(0)
}

/// `map --start-offset` / `--max-length`, with qemu-img's checks and messages.
fn map_bound(v: Option<&str>, what: &str) -> Result<Option<u64>, Fail> {
    let Some(v) = v else { return Ok(None) };
    if v.trim_start().starts_with('-') {
        return Err(Fail::new(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        )));
    }
    match qcow2_core::create::parse_size(v) {
        Ok(n) if n <= i64::MAX as u64 => Ok(Some(n)),
        Ok(_) => Err(Fail::new(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ))),
        Err(_) => Err(Fail::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

async fn cmd_map(p: cli::MapArgs) -> Result<u8, Fail> {
    let (disk, json) = open_one(
        &p.file,
        &p.extra,
        p.format.as_deref(),
        p.output.as_deref(),
        &p.common,
        p.force_share,
    )
    .await?;
    let start = map_bound(p.start_offset.as_deref(), "start offset")?.unwrap_or(0);
    let end = match map_bound(p.max_length.as_deref(), "max length")? {
        Some(len) => start.saturating_add(len),
        None => u64::MAX,
    };
    let chain = info::chain(&disk);
    // Streamed: each entry is printed as soon as it is known (constant memory).
    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    let mut put = |s: &str| -> qcow2_core::Result<()> {
        w.write_all(s.as_bytes())
            .map_err(|e| qcow2_core::Error::io(e, "writing the map"))
    };
    if json {
        put("[")?;
    } else {
        put(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        ))?;
    }
    disk.map_range_each(start, end, |e| {
        if json {
            if !first {
                put(",\n")?;
            }
            first = false;
            put(&info::map_json_line(&e))?;
        } else if e.data && e.offset.is_none() {
            // Data with no host offset to print (compressed clusters): qemu-img's human
            // map stops there with this message and exit code 1.
            return Err(qcow2_core::Error::unsupported(
                "File contains external, encrypted or compressed clusters.",
            ));
        } else if let (true, Some(o)) = (e.data, e.offset) {
            let layer = chain.get(e.depth as usize).copied().unwrap_or(&disk);
            let fname = match layer {
                Disk::Qcow2(i) => i.data_file_path().unwrap_or(i.path()).display().to_string(),
                Disk::Raw(_) => layer.path().display().to_string(),
            };
            put(&format!(
                "{:<16}{:<16}{:<16}{}\n",
                hex(e.start),
                hex(e.length),
                hex(o),
                fname
            ))?;
        }
        Ok(())
    })
    .await?;
    if json {
        put("]\n")?;
    }
    w.flush()
        .map_err(|e| qcow2_core::Error::io(e, "writing the map"))?;
    Ok(0)
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn progress_printer() -> Arc<dyn Fn(f64) + Send + Sync> {
    let last = Arc::new(std::sync::Mutex::new(-1.0f64));
    Arc::new(move |f: f64| {
        let pct = (f * 100.0 * 100.0).floor() / 100.0;
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if pct - *l >= 1.0 || (pct >= 100.0 && *l < 100.0) {
            *l = pct;
            eprint!("\r    ({pct:.2}/100%)");
            if pct >= 100.0 {
                eprintln!();
            }
        }
    })
}

fn parse_engine(aio: Option<&str>) -> Result<EngineKind, Fail> {
    match aio {
        None => Ok(EngineKind::Auto),
        Some(s) => s.parse().map_err(Fail::new),
    }
}

fn create_options(options: &[String], fmt: &str) -> Result<CreateOptions, Fail> {
    let mut co = CreateOptions::default();
    for o in options {
        for (k, v) in create::split_options(o)? {
            if fmt == "raw" && k != "size" && k != "preallocation" {
                return Err(Fail::new(format!("Invalid parameter '{k}'")));
            }
            co.set(&k, &v)?;
        }
    }
    Ok(co)
}

/// When a `-o` value asks for the option list (`-o help`, `-o ?`), print it (as qemu-img
/// does, for creating `fmt` or for amending) and say so: the command then exits 0.
fn print_options_help(options: &[String], fmt: Format, amend: bool) -> Result<bool, Fail> {
    if !options.iter().any(|o| create::wants_option_help(o)) {
        return Ok(false);
    }
    print!("{}", create::options_help(fmt, amend)?);
    Ok(true)
}

fn check_fmt(f: &str) -> Result<Format, Fail> {
    Ok(Format::parse(f)?)
}

async fn cmd_create(p: cli::CreateArgs) -> Result<u8, Fail> {
    let fmt = p.format.as_deref().unwrap_or("raw");
    let fmt = check_fmt(fmt)?;
    if print_options_help(&p.options, fmt, false)? {
        return Ok(0);
    }
    let (file, size) = match operands(&[&p.file, &p.size], &p.extra).as_slice() {
        [f] => (f.clone(), None),
        [f, s] => (f.clone(), Some(image_size(s)?)),
        [] => return Err(Fail::new("expecting a file name")),
        _ => return Err(Fail::new("too many arguments")),
    };
    let mut co = create_options(&p.options, fmt.name())?;
    if let Some(s) = size {
        co.size = Some(s);
    }
    if let Some(b) = &p.backing {
        co.backing_file = Some(b.clone());
    }
    if let Some(f) = &p.backing_format {
        co.backing_format = Some(f.clone());
    }
    co.unsafe_backing = p.unsafe_backing;
    let path = Path::new(&file);
    match fmt {
        Format::Raw => {
            let size = co
                .size
                .ok_or_else(|| Fail::new(format!("{file}: image size must be given")))?;
            if !p.quiet {
                println!("Formatting '{file}', fmt=raw size={size}");
            }
            create::create_raw(path, size, co.preallocation)
                .await
                .map_err(|e| Fail::new(format!("{file}: {}", e)))?;
        }
        Format::Qcow2 => {
            let size = create::create_qcow2(path, &co)
                .await
                .map_err(|e| prefixed(&file, e))?;
            if !p.quiet {
                println!("{}", co.summary(path, size));
            }
        }
    }
    Ok(0)
}

fn prefixed(file: &str, e: qcow2_core::Error) -> Fail {
    let m = e.to_string();
    if m.starts_with(file) {
        Fail::new(m)
    } else {
        Fail::new(format!("{file}: {m}"))
    }
}

async fn cmd_resize(p: cli::ResizeArgs) -> Result<u8, Fail> {
    // (A negative size operand, "-1G", reaches here after a "--": see `crate::resize_argv`.)
    let ops = operands(&[&p.file, &p.size], &p.extra);
    let (file, size_s) = match ops.as_slice() {
        [f, s] => (f.clone(), s.clone()),
        _ => return Err(Fail::new("resize needs a file name and a size")),
    };
    match p.preallocation.as_deref() {
        None | Some("off") => {}
        Some(m @ ("metadata" | "falloc" | "full")) => {
            return Err(Fail::new(format!(
                "resize --preallocation={m} is not supported (only off)"
            )))
        }
        Some(m) => return Err(Fail::new(format!("Invalid preallocation mode '{m}'"))),
    }
    let mut oo = open_opts(&p.common, false);
    oo.writable = true;
    let disk = open(&file, p.format.as_deref(), &oo).await?;
    let cur = disk.size();
    let new = if let Some(d) = size_s.strip_prefix('+') {
        cur.checked_add(create::parse_size(d)?)
            .ok_or_else(|| Fail::new("size overflow"))?
    } else if let Some(d) = size_s.strip_prefix('-') {
        cur.checked_sub(create::parse_size(d)?)
            .ok_or_else(|| Fail::new(format!("{file}: new size would be negative")))?
    } else {
        create::parse_size(&size_s)?
    };
    match &disk {
        Disk::Qcow2(img) => {
            img.resize(new, p.shrink)
                .await
                .map_err(|e| prefixed(&file, e))?;
            img.flush().await.map_err(|e| prefixed(&file, e))?;
        }
        Disk::Raw(_) => {
            if new < cur && !p.shrink {
                return Err(Fail::new(format!(
                    "{file}: use the --shrink option to shrink an image"
                )));
            }
            let st = disk.raw_storage().expect("raw disk has storage");
            st.set_len(new)
                .map_err(|e| Fail::new(format!("{file}: {}", qcow2_core::Error::from(e))))?;
        }
    }
    if !p.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

async fn cmd_convert(p: cli::ConvertArgs) -> Result<u8, Fail> {
    let existing = p.no_create;
    let target_is_zero = p.target_is_zero;
    if target_is_zero && !existing {
        return Err(Fail::new("--target-is-zero requires use of -n flag"));
    }
    let sparse_size = match p.sparse_size.as_deref() {
        None => convert::ZERO_GRANULE as u64,
        Some(v) => {
            let n = qcow2_core::create::parse_size(v).map_err(|_| {
                Fail::new(format!(
                    "Invalid buffer size for sparse output specified: '{v}'."
                ))
            })?;
            if !n.is_multiple_of(512) || n > 16 << 20 {
                return Err(Fail::new(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
                ));
            }
            n
        }
    };
    let out_fmt = check_fmt(p.target_format.as_deref().unwrap_or("raw"))?;
    if print_options_help(&p.options, out_fmt, false)? {
        return Ok(0);
    }
    let ops = operands(&[&p.src, &p.dst], &p.extra);
    let [src, dst] = ops.as_slice() else {
        return Err(Fail::new(
            "convert needs exactly one source and one destination",
        ));
    };
    let parallel = match p.parallel.as_deref() {
        None => 8,
        Some(m) => match m.parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => n,
            _ => {
                return Err(Fail::new(format!(
                    "invalid number of coroutines '{m}' (1 to 64)"
                )))
            }
        },
    };
    let engine = parse_engine(p.aio.as_deref())?;
    let cache = cache_mode(p.cache.as_deref(), "cache ")?;
    // The source is only read: its cache mode changes nothing, but is checked.
    cache_mode(p.source_cache.as_deref(), "source cache ")?;
    let mut oo = open_opts(&p.common, p.force_share);
    oo.engine = engine;
    if let Some(l) = &p.snapshot {
        oo.snapshot = Some(snapshot_param(l)?);
    }
    let disk = open(src, p.format.as_deref(), &oo).await.map_err(|f| {
        if oo.snapshot.is_some() && f.msg.contains("Can't find snapshot") {
            Fail::new("Failed to load snapshot: Can't find snapshot")
        } else {
            f
        }
    })?;
    let mut create = create_options(&p.options, out_fmt.name())?;
    if let Some(b) = &p.backing {
        create.backing_file = Some(b.clone());
        if out_fmt != Format::Qcow2 {
            return Err(Fail::new("-B requires the qcow2 output format"));
        }
    }
    if let Some(f) = &p.backing_format {
        create.backing_format = Some(f.clone());
    }
    let compress = p.compress;
    let mut co = ConvertOptions {
        parallel: ConvertOptions::requests_in_flight(parallel, compress),
        sparse_size,
        existing,
        target_is_zero,
        ..Default::default()
    };
    co.file.engine = engine;
    co.file.direct = cache.direct;
    co.file.no_flush = cache.no_flush;
    if p.progress && !p.quiet {
        co.progress = Some(progress_printer());
    }
    let target = convert::Target {
        format: out_fmt,
        create,
        compress,
    };
    convert::convert(&disk, Path::new(dst), &target, &co)
        .await
        .map_err(|e| {
            let m = e.to_string();
            // qemu-img's own messages for an existing target, unprefixed as there.
            if existing
                && (m.starts_with("output file is smaller") || m.starts_with("Could not open"))
            {
                Fail::new(m)
            } else {
                prefixed(dst, e)
            }
        })?;
    Ok(0)
}

/// `convert -l`: `snapshot.id=ID[,snapshot.name=NAME]`, `snapshot.name=NAME`, or an ID or name.
fn snapshot_param(l: &str) -> Result<qcow2_core::SnapshotKey, Fail> {
    use qcow2_core::SnapshotKey;
    if !l.starts_with("snapshot.") {
        return Ok(SnapshotKey::IdOrName(l.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for part in l.split(',') {
        match part.split_once('=') {
            Some(("snapshot.id", v)) => id = Some(v.to_string()),
            Some(("snapshot.name", v)) => name = Some(v.to_string()),
            Some((k, _)) => return Err(Fail::new(format!("Invalid parameter '{k}'"))),
            None => return Err(Fail::new(format!("Invalid parameter '{part}'"))),
        }
    }
    Ok(match (id, name) {
        (Some(i), Some(n)) => SnapshotKey::IdAndName(i, n),
        (Some(i), None) => SnapshotKey::Id(i),
        (None, Some(n)) => SnapshotKey::Name(n),
        (None, None) => return Err(Fail::new(format!("Invalid parameter '{l}'"))),
    })
}

async fn cmd_compare(p: cli::CompareArgs) -> Result<u8, Fail> {
    let ops = operands(&[&p.file1, &p.file2], &p.extra);
    let [file1, file2] = ops.as_slice() else {
        // qemu-img exits 1 for a usage error of compare (2 means "error while comparing").
        return Err(Fail::new("compare needs exactly two file names").code(1));
    };
    let oo = open_opts(&p.common, p.force_share);
    let a = open(file1, p.a_format.as_deref(), &oo)
        .await
        .map_err(|f| f.code(2))?;
    let b = open(file2, p.b_format.as_deref(), &oo)
        .await
        .map_err(|f| f.code(2))?;
    let quiet = p.quiet;
    if a.size() != b.size() && !p.strict && !quiet {
        println!("Warning: Image size mismatch!");
    }
    match convert::compare(&a, &b, p.strict)
        .await
        .map_err(|e| Fail::from(e).code(2))?
    {
        CompareResult::Identical => {
            if !quiet {
                println!("Images are identical.");
            }
            Ok(0)
        }
        CompareResult::Mismatch(off) => {
            if !quiet {
                // qemu-img reports the start of the first differing sector.
                println!("Content mismatch at offset {}!", off & !511);
            }
            Ok(1)
        }
        CompareResult::SizeMismatch => {
            if !quiet {
                println!("Strict mode: Image size mismatch!");
            }
            Ok(1)
        }
    }
}

async fn cmd_snapshot(p: cli::SnapshotArgs) -> Result<u8, Fail> {
    use qcow2_core::SnapshotKey;
    let ops: Vec<(&str, &str)> = [
        ("list", p.list.then_some("")),
        ("create", p.create.as_deref()),
        ("apply", p.apply.as_deref()),
        ("delete", p.delete.as_deref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    if ops.len() > 1 {
        return Err(Fail::new("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    let file = one_operand(&operands(&[&p.file], &p.extra), "a file name")?;
    let (op, name) = ops.first().copied().unwrap_or(("list", ""));
    let mut oo = open_opts(&p.common, p.force_share);
    oo.no_backing = true;
    if op == "list" {
        let disk = open(&file, p.format.as_deref(), &oo).await?;
        if let Disk::Qcow2(img) = &disk {
            let snaps = img.snapshots();
            if !snaps.is_empty() {
                print!("{}", info::snapshot_table(&snaps));
            }
        }
        return Ok(0);
    }
    if oo.force_share {
        return Err(Fail::new(
            "force-share=on can only be used with read-only images",
        ));
    }
    oo.writable = true;
    let name = name.to_string();
    let disk = open(&file, p.format.as_deref(), &oo).await?;
    let Disk::Qcow2(img) = &disk else {
        return Err(Fail::new(format!(
            "Could not {op} snapshot '{name}': Operation not supported"
        )));
    };
    let key = SnapshotKey::IdOrName(name.clone());
    let r = match op {
        "create" => img.snapshot_create(&name).await.map(|_| ()),
        "apply" => img.snapshot_apply(&key).await,
        _ => img.snapshot_delete(&key).await,
    };
    let r = match r {
        Ok(()) => img.clone().close().await,
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == qcow2_core::ErrorKind::NotFound && op == "apply" => Err(Fail::new(
            format!("Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"),
        )),
        Err(e) => Err(Fail::new(format!(
            "Could not {op} snapshot '{name}': {}",
            e.message()
        ))),
    }
}

async fn cmd_check(p: cli::CheckArgs) -> Result<u8, Fail> {
    use qcow2_core::check::{self, CheckOptions, Repair};
    let file = one_operand(&operands(&[&p.file], &p.extra), "a file name")?;
    let json = output_json(p.output.as_deref())?;
    let repair = match p.repair.as_deref() {
        None => None,
        Some("leaks") => Some(Repair::Leaks),
        Some("all") => Some(Repair::All),
        Some(o) => {
            return Err(Fail::new(format!(
                "unknown option value for -r (expecting 'leaks' or 'all'): {o}"
            )))
        }
    };
    let mut oo = open_opts(&p.common, p.force_share);
    oo.writable = repair.is_some();
    oo.for_repair = repair.is_some();
    // Damage the check reports must not keep it from running (QEMU's BDRV_O_CHECK).
    oo.for_check = true;
    let disk = open(&file, p.format.as_deref(), &oo).await?;
    let img = match &disk {
        Disk::Qcow2(i) => i,
        Disk::Raw(_) => {
            return Err(Fail::new(format!(
                "{file}: this image format (raw) does not support checks"
            ))
            .code(63))
        }
    };
    let report = check::check(img, &CheckOptions { repair })
        .await
        .map_err(|e| prefixed(&file, e))?;
    img.flush().await.map_err(|e| prefixed(&file, e))?;
    if json {
        print_json(&report.to_json());
    } else if !p.quiet {
        print!("{}", report.human());
    }
    Ok(report.exit_code() as u8)
}

/// A `-t`/`-T` cache mode (none given: writeback), with qemu-img's message for an unknown
/// one.
fn cache_mode(mode: Option<&str>, what: &str) -> Result<CacheMode, Fail> {
    match mode {
        None => Ok(CacheMode::default()),
        Some(m) => {
            CacheMode::parse(m).ok_or_else(|| Fail::new(format!("Invalid {what}option: {m}")))
        }
    }
}

fn image_format(format: Option<&str>) -> Result<Option<Format>, Fail> {
    format.map(check_fmt).transpose()
}

async fn cmd_rebase(p: cli::RebaseArgs) -> Result<u8, Fail> {
    use qcow2_core::rebase::{self, RebaseOptions};
    let file = match operands(&[&p.file], &p.extra).as_slice() {
        [f] => f.clone(),
        _ => return Err(Fail::new("Expecting one image file name")),
    };
    let unsafe_mode = p.unsafe_mode;
    let backing = match &p.backing {
        Some(b) => b.clone(),
        None if unsafe_mode => String::new(),
        None => {
            return Err(Fail::new(
                "Must specify backing file (-b) or use unsafe mode (-u)",
            ))
        }
    };
    let cache = cache_mode(p.cache.as_deref(), "cache ")?;
    cache_mode(p.backing_cache.as_deref(), "source cache ")?;
    let backing_format = match p.backing_format.as_deref() {
        None => None,
        Some(f) => {
            Some(Format::parse(f).map_err(|_| Fail::new(format!("Invalid format name: '{f}'")))?)
        }
    };
    if image_format(p.format.as_deref())? == Some(Format::Raw) {
        return Err(Fail::new(format!(
            "Could not change the backing file to '{backing}': Operation not supported"
        )));
    }
    if p.compress {
        return Err(Fail::new("-c (compress) is not supported by rebase"));
    }
    let mut open = open_opts(&p.common, false);
    // -U is accepted as qemu-img does; the image itself is opened for writing.
    cache.apply(&mut open);
    let quiet = p.quiet;
    let ro = RebaseOptions {
        backing,
        backing_format,
        unsafe_mode,
        open,
        progress: (p.progress && !quiet && !unsafe_mode).then(progress_printer),
    };
    rebase::rebase(Path::new(&file), &ro)
        .await
        .map_err(|e| Fail::new(e.to_string()))?;
    Ok(0)
}

async fn cmd_commit(p: cli::CommitArgs) -> Result<u8, Fail> {
    use qcow2_core::commit::{self, CommitOptions};
    let file = match operands(&[&p.file], &p.extra).as_slice() {
        [f] => f.clone(),
        _ => return Err(Fail::new("Expecting one image file name")),
    };
    let cache = cache_mode(p.cache.as_deref(), "cache ")?;
    if let Some(r) = &p.rate {
        create::parse_size(r).map_err(|_| Fail::new(format!("Invalid rate limit: '{r}'")))?;
    }
    if image_format(p.format.as_deref())? == Some(Format::Raw) {
        return Err(Fail::new("Image does not have a backing file"));
    }
    let mut open = open_opts(&p.common, false);
    cache.apply(&mut open);
    let quiet = p.quiet;
    let co = CommitOptions {
        base: p.base.clone(),
        drop: p.drop,
        open,
        progress: (p.progress && !quiet).then(progress_printer),
    };
    commit::commit(Path::new(&file), &co)
        .await
        .map_err(|e| Fail::new(e.to_string()))?;
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// An image size as qemu-img reads one (`create SIZE`, `measure --size`): a non-negative
/// size below 2^63, with qemu-img's messages.
fn image_size(s: &str) -> Result<u64, Fail> {
    let range =
        || Fail::new("Invalid image size specified. Must be between 0 and 9223372036854775807.");
    if s.trim_start().starts_with('-') {
        return Err(range());
    }
    let v = create::parse_size(s).map_err(|e| match e.kind() {
        // A well-formed number that does not fit gets the range message, as in qemu-img.
        qcow2_core::ErrorKind::OutOfRange => range(),
        _ => Fail::new(format!("Invalid image size specified: '{s}'.")),
    })?;
    if v > i64::MAX as u64 {
        return Err(range());
    }
    Ok(v)
}

async fn cmd_measure(p: cli::MeasureArgs) -> Result<u8, Fail> {
    use qcow2_core::jobs::measure::{self, MeasureOptions};
    let json = output_json(p.output.as_deref())?;
    if p.object.is_some() {
        return Err(Fail::new("--object is not supported"));
    }
    let size = p.size.as_deref().map(image_size).transpose()?;
    let file = match (operands(&[&p.file], &p.extra).as_slice(), size) {
        ([f], None) => Some(f.clone()),
        ([], Some(_)) => None,
        ([_, ..], Some(_)) => {
            return Err(Fail::new(
                "--size N cannot be used together with a filename.",
            ))
        }
        ([], None) => {
            return Err(Fail::new(
                "Either --size N or one filename must be specified.",
            ))
        }
        (_, None) => return Err(Fail::new("Expecting one image file name")),
    };
    if file.is_none() && (p.format.is_some() || p.snapshot.is_some() || p.common.image_opts) {
        return Err(Fail::new(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    let fmt = p.target_format.as_deref().unwrap_or("raw");
    let fmt = Format::parse(fmt).map_err(|_| Fail::new(format!("Unknown file format '{fmt}'")))?;
    let mut mo = MeasureOptions::new(fmt);
    for o in &p.options {
        for (k, v) in create::split_options(o)? {
            mo.set(&k, &v)?;
        }
    }
    if size.is_some() {
        mo.size = size;
    }
    let disk = match &file {
        Some(f) => {
            let mut oo = open_opts(&p.common, p.force_share);
            if let Some(l) = &p.snapshot {
                oo.snapshot = Some(snapshot_param(l)?);
            }
            Some(open(f, p.format.as_deref(), &oo).await.map_err(|e| {
                if oo.snapshot.is_some() && e.msg.contains("Can't find snapshot") {
                    Fail::new("Failed to load snapshot: Can't find snapshot")
                } else {
                    e
                }
            })?)
        }
        None => None,
    };
    let m = measure::measure(disk.as_ref(), &mo).await?;
    if json {
        print_json(&m.to_json());
    } else {
        print!("{}", m.human());
    }
    Ok(0)
}

async fn cmd_amend(p: cli::AmendArgs) -> Result<u8, Fail> {
    use qcow2_core::jobs::amend::{self, AmendOptions};
    if p.object.is_some() {
        return Err(Fail::new("--object is not supported"));
    }
    let opts = &p.options;
    if opts.is_empty() {
        return Err(Fail::new("Must specify options (-o)"));
    }
    if print_options_help(
        opts,
        check_fmt(p.format.as_deref().unwrap_or("qcow2"))?,
        true,
    )? {
        return Ok(0);
    }
    let file = match operands(&[&p.file], &p.extra).as_slice() {
        [f] => f.clone(),
        _ => return Err(Fail::new("Expecting one image file name")),
    };
    // The cache mode is checked first, as qemu-img does.
    let oo = amend_open_options(&p)?;
    let mut ao = AmendOptions::default();
    for o in opts {
        for (k, v) in create::split_options(o)? {
            ao.set(&k, &v)?;
        }
    }
    let disk = open(&file, p.format.as_deref(), &oo).await?;
    let Disk::Qcow2(img) = disk else {
        return Err(Fail::new(
            "Format driver 'raw' does not support option amendment",
        ));
    };
    amend::amend(img, &ao)
        .await
        .map_err(|e| Fail::new(e.message().to_string()))?;
    Ok(0)
}

/// How `amend` opens the image: writable, without its backing file, in the cache mode of
/// `-t` (qemu-img amend's, default writeback; its message for an unknown mode).
fn amend_open_options(p: &cli::AmendArgs) -> Result<OpenOptions, Fail> {
    let mut oo = open_opts(&p.common, false);
    oo.writable = true;
    oo.no_backing = true;
    cache_mode(p.cache.as_deref(), "cache ")?.apply(&mut oo);
    Ok(oo)
}

/// `bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)... [-g GRAN]
/// [-b SRC_FILE [-F SRC_FMT]] [-f FMT] FILE NAME`: the operations run in command-line
/// order, each one durable on its own; the first failure stops the rest (as qemu-img).
async fn cmd_bitmap(p: cli::BitmapArgs, actions: Vec<(String, String)>) -> Result<u8, Fail> {
    if actions.is_empty() {
        return Err(Fail::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let granularity = match p.granularity.as_deref() {
        None => None,
        Some(g) => {
            let v = create::parse_size(g)
                .map_err(|_| Fail::new(format!("Invalid granularity specified: '{g}'.")))?;
            // 0 means the default, as in qemu-img.
            (v != 0).then_some(v)
        }
    };
    if granularity.is_some() && p.add.is_empty() {
        return Err(Fail::new("granularity only supported with --add"));
    }
    if p.source_format.is_some() && p.source_file.is_none() {
        return Err(Fail::new("-F only supported with -b"));
    }
    if p.source_file.is_some() && p.merge.is_empty() {
        return Err(Fail::new(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    let ops = operands(&[&p.file, &p.bitmap], &p.extra);
    let [file, name] = ops.as_slice() else {
        return Err(Fail::new("Expecting filename and bitmap name"));
    };
    let mut oo = open_opts(&p.common, false);
    oo.no_backing = true;
    oo.writable = true;
    let disk = open(file, p.format.as_deref(), &oo).await?;
    let fail =
        |act: &str, msg: &str| Fail::new(format!("Operation {act} on bitmap {name} failed: {msg}"));
    let Disk::Qcow2(img) = &disk else {
        return Err(fail(
            &actions[0].0,
            &format!("Can't store persistent bitmaps to '{file}': Operation not supported"),
        ));
    };
    // A merge source in another file, opened read-only when first needed.
    let mut src_disk: Option<Disk> = None;
    for (act, arg) in &actions {
        let r = match act.as_str() {
            "add" => img.bitmap_add(name, granularity).await,
            "remove" => img.bitmap_remove(name).await,
            "clear" => img.bitmap_clear(name).await,
            "enable" => img.bitmap_set_enabled(name, true).await,
            "disable" => img.bitmap_set_enabled(name, false).await,
            _ => match &p.source_file {
                None => img.bitmap_merge(name, None, arg).await,
                Some(sf) => {
                    if src_disk.is_none() {
                        let mut so = open_opts(&p.common, false);
                        so.no_backing = true;
                        src_disk = Some(open(sf, p.source_format.as_deref(), &so).await?);
                    }
                    match &src_disk {
                        Some(Disk::Qcow2(s)) => img.bitmap_merge(name, Some(s), arg).await,
                        _ => Err(qcow2_core::Error::new(
                            qcow2_core::ErrorKind::NotFound,
                            format!("Dirty bitmap '{arg}' not found"),
                        )),
                    }
                }
            },
        };
        if let Err(e) = r {
            let _ = img.clone().close().await;
            return Err(fail(act, e.message()));
        }
    }
    img.clone().close().await.map_err(|e| prefixed(file, e))?;
    Ok(0)
}

async fn cmd_dd(p: cli::DdArgs) -> Result<u8, Fail> {
    let mut o = qcow2_core::dd::DdOptions::default();
    let (mut input, mut output) = (None, None);
    for a in &p.operands {
        let (k, v) = match a.split_once('=') {
            Some(kv) => kv,
            None => return Err(Fail::new(format!("unrecognized operand {a}"))),
        };
        match k {
            "bs" => {
                o.bs = match qcow2_core::create::parse_size(v) {
                    Ok(n) if (1..=i32::MAX as u64).contains(&n) => n,
                    Ok(_) => {
                        return Err(Fail::new(
                            "Invalid bs specified. Must be between 1 and 2147483647.",
                        ))
                    }
                    Err(_) => return Err(Fail::new(format!("Invalid bs specified: '{v}'."))),
                }
            }
            "count" | "skip" => {
                // Plain numbers (qemu-img takes no suffix here).
                let n = if v.starts_with('-') {
                    return Err(Fail::new(format!(
                        "Invalid {k} specified. Must be between 0 and 9223372036854775807."
                    )));
                } else {
                    v.parse::<i64>()
                        .map_err(|_| Fail::new(format!("Invalid {k} specified: '{v}'.")))?
                        as u64
                };
                if k == "count" {
                    o.count = Some(n);
                } else {
                    o.skip = n;
                }
            }
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            _ => return Err(Fail::new(format!("unrecognized operand {k}"))),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(Fail::new("Must specify both input and output files"));
    };
    o.format = check_fmt(p.target_format.as_deref().unwrap_or("raw"))?;
    let disk = open(
        &input,
        p.format.as_deref(),
        &open_opts(&p.common, p.force_share),
    )
    .await?;
    match qcow2_core::dd::dd(&disk, Path::new(&output), &o)
        .await
        .map_err(|e| prefixed(&output, e))?
    {
        qcow2_core::dd::DdOutcome::Copied => {}
        qcow2_core::dd::DdOutcome::SkipPastEnd => {
            eprintln!("qcow2rs: {input}: cannot skip to specified offset");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-img's cache modes: only `unsafe` ignores flushes, only `none` and `directsync`
    /// bypass the page cache, only `writethrough` and `directsync` write through; unknown
    /// names are refused.
    #[test]
    fn cache_modes() {
        let mode = |m: Option<&str>| {
            cache_mode(m, "cache ")
                .ok()
                .map(|c| (c.direct, c.no_flush, c.write_through))
        };
        assert_eq!(mode(None), Some((false, false, false)));
        assert_eq!(mode(Some("writeback")), Some((false, false, false)));
        assert_eq!(mode(Some("writethrough")), Some((false, false, true)));
        assert_eq!(mode(Some("unsafe")), Some((false, true, false)));
        assert_eq!(mode(Some("none")), Some((true, false, false)));
        assert_eq!(mode(Some("directsync")), Some((true, false, true)));
        assert_eq!(mode(Some("bogus")), None);
        assert_eq!(
            cache_mode(Some("bogus"), "source cache ").unwrap_err().msg,
            "Invalid source cache option: bogus"
        );
        let mut o = OpenOptions::default();
        cache_mode(Some("unsafe"), "cache ")
            .ok()
            .unwrap()
            .apply(&mut o);
        assert!(o.no_flush && !o.direct && !o.write_through);
        cache_mode(Some("directsync"), "cache ")
            .ok()
            .unwrap()
            .apply(&mut o);
        assert!(!o.no_flush && o.direct && o.write_through);
    }

    /// `amend -t CACHE` opens the image in that cache mode (it was accepted and ignored);
    /// an unknown mode is qemu-img's error.
    #[test]
    fn amend_takes_the_cache_mode() {
        let args = |extra: &[&str]| {
            let argv = ["qcow2rs", "amend", "-o", "lazy_refcounts=on"]
                .into_iter()
                .chain(extra.iter().copied())
                .chain(["img.qcow2"]);
            let m = cli::command().try_get_matches_from(argv).unwrap();
            match <cli::Cli as clap::FromArgMatches>::from_arg_matches(&m)
                .unwrap()
                .cmd
            {
                Cmd::Amend(a) => a,
                _ => unreachable!(),
            }
        };
        let opts = |extra: &[&str]| amend_open_options(&args(extra)).ok().unwrap();
        let o = opts(&[]);
        assert!(o.writable && o.no_backing);
        assert!(!o.direct && !o.no_flush && !o.write_through);
        for (mode, direct, no_flush, write_through) in [
            ("none", true, false, false),
            ("directsync", true, false, true),
            ("writethrough", false, false, true),
            ("unsafe", false, true, false),
        ] {
            let o = opts(&["-t", mode]);
            assert_eq!(
                (o.direct, o.no_flush, o.write_through),
                (direct, no_flush, write_through),
                "{mode}"
            );
        }
        assert_eq!(
            amend_open_options(&args(&["-t", "bogus"]))
                .err()
                .unwrap()
                .msg,
            "Invalid cache option: bogus"
        );
    }
}
