//! The supervisor: a small process between leasehold and the command (leasehold re-executed
//! with a hidden subcommand) that ends the command's whole process tree with the term.
//!
//! It makes itself a child subreaper, so every descendant the command orphans (a double fork, a
//! `setsid` daemon) is re-parented to it instead of to init, and it can always find all of them
//! by walking `/proc` from itself. It starts the command in a process group of its own and then
//! waits for one of:
//!
//! - the command exits on its own: everything it left behind gets SIGKILL, then the supervisor
//!   exits with the command's code — leasehold releases the lock only after that;
//! - `T` on the control pipe (or SIGTERM, SIGINT, SIGHUP to the supervisor): SIGTERM to every
//!   descendant; the supervisor exits once all of them are gone;
//! - `K` on the control pipe: SIGKILL to every descendant at once;
//! - end of file on the control pipe: leasehold died (even by SIGKILL — the kernel closes its
//!   end), so SIGKILL to every descendant at once;
//! - the kill deadline passes: SIGKILL to every descendant at once. leasehold passes it at start
//!   (`--kill-at`, CLOCK_MONOTONIC nanoseconds) and moves it with every renew (`D` and 8 bytes
//!   on the control pipe): the term's validity less a margin. It is kept on the supervisor's
//!   own clock, so it holds when leasehold itself is frozen (SIGSTOP, a stuck runtime): without
//!   it, a frozen leasehold's command would run on beside the next leader's.
//!
//! Killing repeats until no descendant is left: a process killed while forking leaves children,
//! which are re-parented to the supervisor and found by the next walk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::child::{die_with_parent, monotonic_nanos, SET_DEADLINE, STARTED};

/// The signals the supervisor handles itself (blocked, read from a signalfd).
const HANDLED: [Signal; 4] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
];

/// How often the supervisor looks again for descendants it is waiting for or killing.
const RESCAN: Duration = Duration::from_millis(20);

/// How long the supervisor keeps trying to kill descendants it has no permission to signal
/// (a setuid program) before it gives up on them.
const GIVE_UP_AFTER: Duration = Duration::from_secs(2);

/// Runs the supervisor: `control_fd` is the read end of leasehold's control pipe, `status_fd`
/// the write end of the pipe on which it reports whether the command started, `kill_at` the
/// first kill deadline (CLOCK_MONOTONIC nanoseconds; `None`: none until leasehold sends one).
/// Returns the supervisor's exit code: the command's (128 + S if signal S killed it).
pub fn supervise(control_fd: RawFd, status_fd: RawFd, kill_at: Option<u64>, argv: &[String]) -> u8 {
    match Supervisor::start(control_fd, status_fd, kill_at, argv) {
        Ok(mut supervisor) => supervisor.run(),
        Err(message) => {
            eprintln!("leasehold supervisor: {message}");
            1
        }
    }
}

struct Supervisor {
    control: File,
    signals: SignalFd,
    me: Pid,
    command: Pid,
    /// The command's exit code, once it has exited and was reaped.
    exited: Option<u8>,
    /// SIGTERM was passed on: wait for every descendant to exit.
    stopping: bool,
    /// SIGKILL the tree at this CLOCK_MONOTONIC instant (nanoseconds), whatever leasehold does.
    kill_at: Option<u64>,
}

/// Opens an inherited pipe end by number, as a new descriptor (close-on-exec), and closes the
/// inherited one, so the command inherits neither.
fn adopt(fd: RawFd, write: bool) -> Result<File, String> {
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot open the inherited descriptor {fd}: {e}"))?;
    nix::unistd::close(fd).map_err(|e| format!("cannot close descriptor {fd}: {e}"))?;
    Ok(file)
}

impl Supervisor {
    fn start(
        control_fd: RawFd,
        status_fd: RawFd,
        kill_at: Option<u64>,
        argv: &[String],
    ) -> Result<Supervisor, String> {
        let control = adopt(control_fd, false)?;
        let mut status = adopt(status_fd, true)?;
        let report = |status: &mut File, message: &str| {
            let _ = status.write_all(message.as_bytes());
        };
        let prepared = Self::prepare();
        let signals = match prepared {
            Ok(signals) => signals,
            Err(message) => {
                report(&mut status, &message);
                return Err(message);
            }
        };
        let Some((program, args)) = argv.split_first() else {
            report(&mut status, "no command given after --");
            return Err("no command given".into());
        };
        let mut command = std::process::Command::new(program);
        command.args(args).process_group(0);
        die_with_parent(&mut command);
        // The command's status is collected by `reap` (waitpid on any child), so the `Child`
        // handle is only used for its pid.
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let message = format!("cannot start {program:?}: {e}");
                report(&mut status, &message);
                return Err(message);
            }
        };
        let command = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        report(&mut status, STARTED);
        drop(status);
        Ok(Supervisor {
            control,
            signals,
            me: nix::unistd::getpid(),
            command,
            exited: None,
            stopping: false,
            kill_at,
        })
    }

    /// Becomes a subreaper and takes the handled signals over.
    fn prepare() -> Result<SignalFd, String> {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("cannot become a child subreaper: {e}"))?;
        let mut mask = SigSet::empty();
        for signal in HANDLED {
            mask.add(signal);
        }
        // Blocked here; the command starts with an empty mask (the standard library resets it
        // in the child before exec).
        mask.thread_block()
            .map_err(|e| format!("cannot block signals: {e}"))?;
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| format!("cannot open a signalfd: {e}"))
    }

    /// How long until the kill deadline (zero once it has passed); `None` without one.
    fn until_kill(&self) -> Option<Duration> {
        self.kill_at
            .map(|at| Duration::from_nanos(at.saturating_sub(monotonic_nanos())))
    }

    fn run(&mut self) -> u8 {
        loop {
            self.reap();
            if self.until_kill() == Some(Duration::ZERO) {
                eprintln!(
                    "leasehold supervisor: the term's validity ends and leasehold neither renewed \
                     it nor stopped the command (frozen or hung?); killing the command (SIGKILL)"
                );
                self.kill_tree();
                return self.exited.unwrap_or(1);
            }
            if let Some(code) = self.exited {
                if !self.stopping {
                    // The command ended on its own: nothing it started outlives it.
                    self.kill_tree();
                    return code;
                }
                if self.descendants().is_empty() {
                    return code;
                }
            }
            let rescan = self.exited.map(|_| RESCAN);
            let wait = match (rescan, self.until_kill()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Rounded up to whole milliseconds: no busy loop just before the deadline.
            let timeout = wait.map_or(PollTimeout::NONE, |wait| {
                PollTimeout::try_from(wait.saturating_add(Duration::from_nanos(999_999)))
                    .unwrap_or(PollTimeout::MAX)
            });
            let (control_ready, signals_ready) = {
                let mut fds = [
                    PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(error) => {
                        eprintln!(
                            "leasehold supervisor: poll failed ({error}); killing the command"
                        );
                        self.kill_tree();
                        return self.exited.unwrap_or(1);
                    }
                }
                let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if signals_ready {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    let signal = i32::try_from(info.ssi_signo)
                        .ok()
                        .and_then(|n| Signal::try_from(n).ok());
                    match signal {
                        Some(Signal::SIGCHLD) | None => {}
                        Some(signal) => {
                            self.stopping = true;
                            self.signal_tree(signal);
                        }
                    }
                }
            }
            if control_ready {
                let mut byte = [0u8; 1];
                match self.control.read(&mut byte) {
                    Ok(1) if byte[0] == b'T' => {
                        self.stopping = true;
                        self.signal_tree(Signal::SIGTERM);
                    }
                    Ok(1) if byte[0] == SET_DEADLINE => {
                        // Written at once by leasehold (9 bytes < PIPE_BUF): all there.
                        let mut at = [0u8; 8];
                        if self.control.read_exact(&mut at).is_err() {
                            self.kill_tree();
                            return self.exited.unwrap_or(1);
                        }
                        self.kill_at = Some(u64::from_be_bytes(at));
                    }
                    Ok(1) => {
                        // `K`, or anything else: kill at once.
                        self.kill_tree();
                        return self.exited.unwrap_or(1);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // End of file (leasehold died) or a broken pipe: kill at once.
                    _ => {
                        self.kill_tree();
                        return self.exited.unwrap_or(1);
                    }
                }
            }
        }
    }

    /// Reaps every exited child (the command, and orphans re-parented to the supervisor);
    /// records the command's code.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if pid == self.command {
                        self.exited = Some(u8::try_from(code & 0xff).unwrap_or(1));
                    }
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    if pid == self.command {
                        self.exited = Some(u8::try_from((128 + signal as i32) & 0xff).unwrap_or(1));
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Sends `signal` to every live descendant.
    fn signal_tree(&self, signal: Signal) {
        for pid in self.descendants() {
            let _ = kill(pid, signal);
        }
    }

    /// SIGKILL to every descendant, again and again, until none is left (and all are reaped).
    fn kill_tree(&mut self) {
        let started = std::time::Instant::now();
        loop {
            self.reap();
            let left = self.descendants();
            if left.is_empty() {
                break;
            }
            let mut refused = Vec::new();
            for pid in left {
                if kill(pid, Signal::SIGKILL) == Err(Errno::EPERM) {
                    refused.push(pid);
                }
            }
            if !refused.is_empty() && started.elapsed() > GIVE_UP_AFTER {
                eprintln!(
                    "leasehold supervisor: no permission to kill {refused:?}; they outlive the term"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.reap();
        if self.exited.is_none() {
            self.exited = Some(128 + Signal::SIGKILL as u8);
        }
    }

    /// Every live (not zombie) descendant of the supervisor, from `/proc`.
    fn descendants(&self) -> Vec<Pid> {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut zombies = std::collections::HashSet::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let Some(ppid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if state == Some("Z") || state == Some("X") {
                zombies.insert(pid);
            }
            children.entry(ppid).or_default().push(pid);
        }
        let mut found = Vec::new();
        let mut queue = vec![self.me.as_raw()];
        while let Some(parent) = queue.pop() {
            for &child in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
                queue.push(child);
                if !zombies.contains(&child) {
                    found.push(Pid::from_raw(child));
                }
            }
        }
        found
    }
}
