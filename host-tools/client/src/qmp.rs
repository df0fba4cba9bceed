//! QEMU's machine protocol (QMP) over its Unix socket: enough for the
//! balloon (`query-balloon`, `balloon`), which `memctl balloon` and the
//! tests drive, and for the virtio-mem device (`query-memory-devices`,
//! `qom-set ... requested-size`). Replies are JSON lines; events on the way are skipped.
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

/// The QOM id xtask gives the virtio-mem device (`--hotplug`).
pub const VIRTIO_MEM_ID: &str = "vm0";

/// The virtio-mem device as QEMU reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMemQmp {
    /// Guest-physical start of the region (`memaddr`).
    pub memaddr: u64,
    /// Bytes in the region (`max-size`: the memory backend's size).
    pub region_size: u64,
    /// Bytes in a block (`block-size`).
    pub block_size: u64,
    /// Bytes the guest has plugged (`size`).
    pub plugged_size: u64,
    /// Bytes the host asks the guest to plug (`requested-size`).
    pub requested_size: u64,
}

impl Qmp {
    /// The virtio-mem device with QOM id [`VIRTIO_MEM_ID`], read in one
    /// `query-memory-devices` (one consistent answer, and the only one
    /// that has the region's size; `qom-get` on `/machine/peripheral/vm0`
    /// reads the same properties one at a time).
    pub fn virtio_mem(&mut self) -> Result<VirtioMemQmp, String> {
        let devices = self.call("query-memory-devices", None)?;
        virtio_mem_in(&devices, VIRTIO_MEM_ID)
    }

    /// Asks the guest to plug `bytes` of the virtio-mem device's region
    /// (`qom-set vm0 requested-size`): a multiple of the block size, at
    /// most the region's size (QEMU refuses other values, saying why).
    pub fn set_virtio_mem_requested_size(&mut self, bytes: u64) -> Result<(), String> {
        self.call(
            "qom-set",
            Some(json!({
                "path": format!("/machine/peripheral/{VIRTIO_MEM_ID}"),
                "property": "requested-size",
                "value": bytes,
            })),
        )
        .map(|_| ())
    }
}

/// The virtio-mem device `id` in a `query-memory-devices` answer.
fn virtio_mem_in(devices: &Value, id: &str) -> Result<VirtioMemQmp, String> {
    let data = devices
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d.get("type").and_then(Value::as_str) == Some("virtio-mem"))
        .filter_map(|d| d.get("data"))
        .find(|d| d.get("id").and_then(Value::as_str) == Some(id))
        .ok_or_else(|| {
            format!("QMP: no virtio-mem device {id:?} (QEMU started without --hotplug?)")
        })?;
    let field = |name: &str| {
        data.get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("QMP: virtio-mem {id:?} has no {name}"))
    };
    Ok(VirtioMemQmp {
        memaddr: field("memaddr")?,
        region_size: field("max-size")?,
        block_size: field("block-size")?,
        plugged_size: field("size")?,
        requested_size: field("requested-size")?,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mem_is_read_from_query_memory_devices() {
        // QEMU 7.2's answer for `-m 1G,maxmem=5G` and a 4 GiB region with
        // 2 MiB plugged, beside a DIMM.
        let answer = json!([
            { "type": "dimm", "data": { "id": "d0", "addr": 1 } },
            { "type": "virtio-mem", "data": {
                "memdev": "/objects/vmem0", "memaddr": 4294967296u64,
                "block-size": 2097152, "size": 2097152, "node": 0,
                "max-size": 4294967296u64, "requested-size": 2097152, "id": "vm0" } }
        ]);
        assert_eq!(
            virtio_mem_in(&answer, "vm0"),
            Ok(VirtioMemQmp {
                memaddr: 4 << 30,
                region_size: 4 << 30,
                block_size: 2 << 20,
                plugged_size: 2 << 20,
                requested_size: 2 << 20,
            })
        );
        let e = virtio_mem_in(&answer, "vm1").unwrap_err();
        assert!(e.contains("no virtio-mem device"), "{e}");
        assert!(virtio_mem_in(&json!([]), "vm0").is_err());
        let partial = json!([{ "type": "virtio-mem", "data": { "id": "vm0", "memaddr": 0 } }]);
        assert!(virtio_mem_in(&partial, "vm0")
            .unwrap_err()
            .contains("no max-size"));
    }
}
