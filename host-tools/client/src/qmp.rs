//! QEMU's machine protocol (QMP) over its Unix socket: enough for the
//! balloon (`query-balloon`, `balloon`), which `memctl balloon` and the
//! tests drive. Replies are JSON lines; events on the way are skipped.
//! Beside it, what the host's `/proc` says of a local QEMU process: which
//! one it is ([`qemu_process`]) and its resident memory
//! ([`resident_bytes`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// A QMP connection, past its greeting and capabilities negotiation.
pub struct Qmp {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let s =
            UnixStream::connect(path).map_err(|e| format!("QMP socket {}: {e}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            out: s.try_clone().map_err(|e| e.to_string())?,
            input: BufReader::new(s),
        };
        q.line()?; // greeting
        q.call("qmp_capabilities", None)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        if self
            .input
            .read_line(&mut l)
            .map_err(|e| format!("QMP: {e}"))?
            == 0
        {
            return Err("QMP: connection closed".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e}"))
    }

    /// Runs `command`; its `return` value. Events on the way are skipped.
    pub fn call(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        writeln!(self.out, "{msg}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!(
                    "QMP {command}: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("error")
                ));
            }
        }
    }
}

impl Qmp {
    /// The guest's memory as the host counts it: RAM less the balloon.
    pub fn balloon_actual(&mut self) -> Result<u64, String> {
        self.call("query-balloon", None)?
            .get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| "QMP query-balloon: no actual size".to_string())
    }

    /// The guest's own statistics through the balloon (`virsh dommemstat`):
    /// `stat-*` name and value pairs, once the guest has sent some. Asks
    /// for them every 2 s if nobody asked yet (the first come a moment
    /// later). The balloon must have QOM id `balloon0`, as xtask gives it.
    pub fn guest_stats(&mut self) -> Result<Vec<(String, u64)>, String> {
        let path = "/machine/peripheral/balloon0";
        let interval = self.call(
            "qom-get",
            Some(json!({ "path": path, "property": "guest-stats-polling-interval" })),
        )?;
        if interval.as_u64() == Some(0) {
            self.call(
                "qom-set",
                Some(
                    json!({ "path": path, "property": "guest-stats-polling-interval", "value": 2 }),
                ),
            )?;
        }
        let v = self.call(
            "qom-get",
            Some(json!({ "path": path, "property": "guest-stats" })),
        )?;
        if v.get("last-update").and_then(Value::as_u64).unwrap_or(0) == 0 {
            return Ok(Vec::new());
        }
        Ok(v.get("stats")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| {
                        v.as_i64()
                            .filter(|&n| n >= 0)
                            .map(|n| (k.clone(), n as u64))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Asks the guest to make its memory `bytes` (`virsh setmem`).
    pub fn set_balloon(&mut self, bytes: u64) -> Result<(), String> {
        self.call("balloon", Some(json!({ "value": bytes })))
            .map(|_| ())
    }
}

/// The process on this host whose command line contains `word` (a QEMU's
/// QMP socket path or port forward).
pub fn qemu_process(word: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(word)
                .then_some(pid)
        })
}

/// A process's resident memory (`VmRSS`), in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
