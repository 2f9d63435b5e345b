//! `qcow2rs`: a qemu-img compatible command-line tool over qcow2-core.
//!
//! The library target holds the whole tool behind [`run`], so that the `qcow2rs` binary and
//! the console script of the Python package (`qcow2rs._qcow2rs.cli_main`) run the same code.

mod bench;
mod cli;
mod cmds;
mod dump;

use clap::FromArgMatches;

/// An error for the user: a message (one line) and an exit code.
pub(crate) struct Fail {
    pub msg: String,
    pub code: u8,
}

impl Fail {
    pub fn new(msg: impl Into<String>) -> Fail {
        Fail {
            msg: msg.into(),
            code: 1,
        }
    }
    pub fn code(mut self, code: u8) -> Fail {
        self.code = code;
        self
    }
}

impl From<qcow2_core::Error> for Fail {
    fn from(e: qcow2_core::Error) -> Fail {
        Fail::new(e.to_string())
    }
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::new(s)
    }
}

/// Run the tool with `argv` (program name first) and return the exit status. Output goes to
/// the process's stdout and stderr (flushed before returning).
pub fn run(argv: &[String]) -> u8 {
    let code = run_inner(argv);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn run_inner(argv: &[String]) -> u8 {
    let mut argv: Vec<String> = argv.to_vec();
    if argv.is_empty() {
        argv.push("qcow2rs".to_string());
    }
    // `qcow2rs help CMD` is `qcow2rs CMD --help`.
    if argv.len() > 2 && argv[1] == "help" {
        argv = vec![argv[0].clone(), argv[2].clone(), "--help".to_string()];
    }
    resize_argv(&mut argv);
    let matches = match cli::command().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => return clap_error(&e, &argv),
    };
    let parsed = match cli::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_error(&e, &argv),
    };
    let res = match parsed.cmd {
        cli::Cmd::Completions(a) => {
            let mut out = std::io::stdout();
            clap_complete::generate(a.shell, &mut cli::command(), "qcow2rs", &mut out);
            Ok(0)
        }
        cli::Cmd::Manpage(a) => cli::manpages(a.dir.as_deref(), &mut std::io::stdout())
            .map(|()| 0)
            .map_err(|e| Fail::new(format!("writing the man page: {e}"))),
        cmd => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if matches!(cmd, cli::Cmd::Serve(_)) {
                b.worker_threads(serve_workers());
            }
            let rt = match b.thread_name("qcow2rs-worker").enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("qcow2rs: cannot start the runtime: {e}");
                    return 1;
                }
            };
            // A completion wakes the worker waiting in the runtime's reactor, which
            // reaps it, rather than the ring's completion thread, which would wake a
            // worker in turn. Not for bench: its requests run on threads that wait in
            // their rings (`io::block_on`) and reap them; a task watching those rings
            // would only wake a worker for each completion, to leave it to that thread
            // (twice the context switches of the 4 KiB O_DIRECT read row).
            if !matches!(cmd, cli::Cmd::Bench(_)) {
                qcow2_core::io::reap_in_runtime(rt.handle());
            }
            let sub = matches.subcommand().map(|(_, m)| m);
            let res = rt.block_on(cmds::run(cmd, sub, &argv));
            // The command's work is done (its images closed and flushed): the workers
            // are told to stop, not waited for (dropping the runtime would join each,
            // a wake-up and a scheduling delay apiece before the process can exit).
            rt.shutdown_background();
            res
        }
    };
    match res {
        Ok(code) => code,
        Err(f) => {
            let msg = f.msg.replace('\n', " ");
            eprintln!("qcow2rs: {msg}");
            f.code
        }
    }
}

/// Report a parse error as qemu-img does (one line, exit 1); help and version go to stdout
/// with exit 0.
fn clap_error(e: &clap::Error, argv: &[String]) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp => {
            let _ = e.print();
            0
        }
        ErrorKind::DisplayVersion => {
            // As qemu-img words it.
            println!("qcow2rs version {}", env!("CARGO_PKG_VERSION"));
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            1
        }
        ErrorKind::InvalidSubcommand => {
            let name = argv.get(1).map(String::as_str).unwrap_or_default();
            eprintln!("qcow2rs: unknown command '{name}' (try 'qcow2rs --help')");
            1
        }
        _ => {
            let sub = argv
                .get(1)
                .filter(|s| cli::command().find_subcommand(s.as_str()).is_some())
                .map(|s| format!(" {s}"))
                .unwrap_or_default();
            eprintln!("qcow2rs: {} (try 'qcow2rs{sub} --help')", cli::one_line(e));
            1
        }
    }
}

/// `qcow2rs resize FILE -1G`: a final "-N..." operand would read as an option, so it goes
/// after a "--" (unless one is there already), as qemu-img's parser takes it.
fn resize_argv(argv: &mut Vec<String>) {
    if argv.get(1).map(String::as_str) != Some("resize") || argv[2..].iter().any(|a| a == "--") {
        return;
    }
    let negative = argv
        .last()
        .is_some_and(|a| a.starts_with('-') && a[1..].starts_with(|c: char| c.is_ascii_digit()));
    if negative && argv.len() > 2 {
        let at = argv.len() - 1;
        argv.insert(at, "--".to_string());
    }
}

/// Worker threads of `qcow2rs serve`: one per CPU, and at least two. A request's page-cache
/// read and the writing of its reply run on the worker that holds them; with a single worker
/// (the server confined to one CPU) a preempted worker stalls every connection
/// (`nbdcopy` of 1 GiB took 1.3-1.6 s with one worker on one busy CPU, 0.8-1.1 s with two).
/// More workers than CPUs cost the write rows: each spare worker is woken and parked again
/// (four workers on two CPUs: up to 3x the futex calls, more context switches and migrations
/// per 4 KiB write, 3-7% more server CPU on tmpfs). See docs/PERFORMANCE.md (NBD).
/// `TOKIO_WORKER_THREADS` still decides when set.
fn serve_workers() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(2)
}
