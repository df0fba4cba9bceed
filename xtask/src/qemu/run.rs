//! Running a guest within its configuration's time bound while reading its
//! console, optionally with a client that talks to it once it is ready.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{QemuConfig, INITIALISED_LINE, READY_LINE};

/// What a bounded run saw.
#[derive(Debug)]
pub struct RunOutcome {
    /// Console lines (stdout), with the time each arrived after spawn.
    pub lines: Vec<(Duration, String)>,
    pub stderr: String,
    /// QEMU's exit status; `None` if it was killed (timeout or stop condition).
    pub status: Option<i32>,
    pub timed_out: bool,
    /// Time from spawn to the `memd: ready` line.
    pub ready_after: Option<Duration>,
    /// Time from spawn to the `memd: all memory initialised` line.
    pub initialised_after: Option<Duration>,
    /// What the `on_ready` action returned, if it ran.
    pub action: Option<Result<(), String>>,
}

impl RunOutcome {
    pub fn console(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn panicked(&self) -> bool {
        self.lines
            .iter()
            .any(|(_, l)| l.contains("memd: PANIC") || l.contains("memd: FATAL"))
    }
}

/// Kills the child when dropped (so no QEMU outlives an error path).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1 (for a host forward).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl QemuConfig {
    /// Runs the guest until QEMU exits (or the time bound), collecting its
    /// console.
    pub fn run_to_exit(&self) -> Result<RunOutcome> {
        run(self, false, None)
    }

    /// As [`Self::run_to_exit`], but QEMU is killed as soon as `memd:
    /// ready` and `memd: all memory initialised` have appeared.
    pub fn run_until_ready(&self) -> Result<RunOutcome> {
        run(self, true, None)
    }

    /// As [`Self::run_to_exit`]; when `memd: ready` has appeared and all
    /// memory is initialised, runs `on_ready` (a client talking to the
    /// guest), records its result in [`RunOutcome::action`] and stops
    /// QEMU.
    pub fn run_then(&self, on_ready: &mut dyn FnMut() -> Result<(), String>) -> Result<RunOutcome> {
        run(self, false, Some(on_ready))
    }

    /// [`Self::run_then`] with a client that returns a value: the outcome,
    /// and what `client` returned (None when the guest never became ready).
    pub fn run_client<T>(
        &self,
        client: impl FnOnce() -> Result<T>,
    ) -> Result<(RunOutcome, Option<Result<T>>)> {
        let mut client = Some(client);
        let mut result = None;
        let mut action = || -> Result<(), String> {
            let Some(client) = client.take() else {
                return Ok(());
            };
            let r = client();
            let msg = r.as_ref().err().map(|e| format!("{e:#}"));
            result = Some(r);
            msg.map_or(Ok(()), Err)
        };
        let out = self.run_then(&mut action)?;
        Ok((out, result))
    }
}

/// Runs `cfg`'s guest for at most its time bound, collecting its console.
/// If `stop_at_ready` is set, QEMU is killed as soon as `memd: ready` and
/// `memd: all memory initialised` have appeared; if `on_ready` is given, it
/// runs then and QEMU is stopped after.
fn run(
    cfg: &QemuConfig,
    stop_at_ready: bool,
    mut on_ready: Option<&mut dyn FnMut() -> Result<(), String>>,
) -> Result<RunOutcome> {
    let timeout = cfg.time_bound;
    let mut cmd = cfg.command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .with_context(|| format!("starting {}", cfg.qemu().display()))?,
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let s = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send((start.elapsed(), s)).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut out = RunOutcome {
        lines: Vec::new(),
        stderr: String::new(),
        status: None,
        timed_out: false,
        ready_after: None,
        initialised_after: None,
        action: None,
    };
    let deadline = start + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            out.timed_out = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((t, line)) => {
                if line.contains(READY_LINE) && out.ready_after.is_none() {
                    out.ready_after = Some(t);
                }
                let settled = line.contains(INITIALISED_LINE) && out.initialised_after.is_none();
                if settled {
                    out.initialised_after = Some(t);
                }
                out.lines.push((t, line));
                if settled && out.ready_after.is_some() {
                    if let Some(action) = on_ready.as_mut() {
                        out.action = Some(action());
                        break;
                    }
                    if stop_at_ready {
                        break;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                out.timed_out = true;
                break;
            }
            // stdout closed: QEMU is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if out.timed_out || out.action.is_some() || (stop_at_ready && out.ready_after.is_some()) {
        let _ = child.0.kill();
    }
    let status = child.0.wait().context("waiting for QEMU")?;
    out.status = status.code();
    let _ = reader.join();
    // Lines that arrived between the stop and the kill.
    out.lines.extend(rx.try_iter());
    out.stderr = err_reader.join().unwrap_or_default();
    Ok(out)
}
