//! A memd domain's definition: libvirt's XML for one memd.

use std::fmt::Write;
use std::path::PathBuf;

/// The namespace of memd's metadata in a domain definition, where the
/// address and the instance's directory are kept.
pub const METADATA_URI: &str = "https://github.com/memd/libvirt/1";

/// One memd under libvirt.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    /// Host port forwarded to the guest's control port (the same number).
    pub port: u16,
    pub mem_mib: u64,
    pub kernel: PathBuf,
    /// The instance's directory: its tokens and console log.
    pub dir: PathBuf,
    /// KVM where usable, else TCG (libvirt's `qemu` domain type).
    pub kvm: bool,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Owner of `dir`: QEMU runs as this user, so it reads the tokens
    /// without their mode being widened.
    pub uid: u32,
    pub gid: u32,
    /// A virtio-mem region of this many MiB, nothing plugged at start.
    pub hotplug_mib: Option<u64>,
}

impl Domain {
    pub fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }

    pub fn operator_token_file(&self) -> PathBuf {
        self.dir.join("operator-token")
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The domain definition:
    /// - q35 with direct kernel boot (libvirt does not model QEMU's
    ///   microvm machine);
    /// - the tokens as fw_cfg files (`<sysinfo type='fwcfg'>`), never on the
    ///   command line;
    /// - the serial console to a file;
    /// - libvirt's own virtio balloon, with statistics every 2 s, free page
    ///   reporting and deflate on OOM;
    /// - with `hotplug_mib`, a virtio-mem device (`<memory
    ///   model='virtio-mem'>`, 2 MiB blocks, nothing requested), which
    ///   libvirt takes only with `<maxMemory>` and a NUMA cell for the
    ///   boot memory; `virsh update-memory-device --requested-size` resizes
    ///   it;
    /// - virtio-net on QEMU's user-mode network with the control port
    ///   forwarded from 127.0.0.1, through `<qemu:commandline>`: libvirt's
    ///   `<interface type='user'>` forwards ports only with the passt
    ///   backend.
    pub fn xml(&self) -> String {
        let (ty, cpu_mode) = if self.kvm {
            ("kvm", "mode='host-passthrough'")
        } else {
            ("qemu", "mode='maximum' migratable='off'")
        };
        let cpu = match self.hotplug_mib {
            None => format!("<cpu {cpu_mode}/>"),
            Some(_) => format!(
                "<cpu {cpu_mode}>\n    <numa>\n      <cell id='0' cpus='0' memory='{}' unit='MiB'/>\n    </numa>\n  </cpu>",
                self.mem_mib
            ),
        };
        let virtio_mem = match self.hotplug_mib {
            None => String::new(),
            Some(mib) => format!(
                "\n    <memory model='virtio-mem'>\n      <target>\n        <size unit='MiB'>{mib}</size>\n        <node>0</node>\n        <block unit='KiB'>2048</block>\n        <requested unit='MiB'>0</requested>\n      </target>\n    </memory>"
            ),
        };
        let cmdline = format!("memd.port={} {}", self.port, self.cmdline);
        let mut x = String::new();
        let _ = writeln!(
            x,
            "<domain type='{ty}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        );
        let _ = writeln!(x, "  <name>{}</name>", esc(&self.name));
        let _ = writeln!(
            x,
            "  <metadata>\n    <memd:instance xmlns:memd='{METADATA_URI}'>\n      <memd:addr>{}</memd:addr>\n      <memd:dir>{}</memd:dir>\n    </memd:instance>\n  </metadata>",
            self.addr(),
            esc(&self.dir.display().to_string())
        );
        if let Some(mib) = self.hotplug_mib {
            let _ = writeln!(
                x,
                "  <maxMemory slots='1' unit='MiB'>{}</maxMemory>",
                self.mem_mib + mib
            );
        }
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.mem_mib);
        let _ = writeln!(x, "  <vcpu>1</vcpu>");
        let _ = writeln!(
            x,
            "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    <kernel>{}</kernel>\n    <cmdline>{}</cmdline>\n  </os>",
            esc(&self.kernel.display().to_string()),
            esc(cmdline.trim())
        );
        let _ = writeln!(
            x,
            "  <sysinfo type='fwcfg'>\n    <entry name='opt/memd/token' file='{}'/>\n    <entry name='opt/memd/operator-token' file='{}'/>\n  </sysinfo>",
            esc(&self.token_file().display().to_string()),
            esc(&self.operator_token_file().display().to_string())
        );
        let _ = writeln!(x, "  {cpu}");
        let _ = writeln!(
            x,
            "  <seclabel type='static' model='dac' relabel='no'>\n    <label>+{}:+{}</label>\n  </seclabel>",
            self.uid, self.gid
        );
        let _ = writeln!(
            x,
            "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>"
        );
        let _ = writeln!(
            x,
            "  <devices>\n    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n    <memballoon model='virtio' autodeflate='on' freePageReporting='on'>\n      <stats period='2'/>\n    </memballoon>{virtio_mem}\n  </devices>",
            esc(&self.console().display().to_string())
        );
        let _ = writeln!(
            x,
            "  <qemu:commandline>\n    <qemu:arg value='-netdev'/>\n    <qemu:arg value='user,id=memdnet,hostfwd=tcp:127.0.0.1:{p}-:{p}'/>\n    <qemu:arg value='-device'/>\n    <qemu:arg value='virtio-net-pci,netdev=memdnet,bus=pcie.0,addr=0x10'/>\n  </qemu:commandline>",
            p = self.port
        );
        x.push_str("</domain>\n");
        x
    }
}

/// `s` escaped for an XML attribute or text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_keeps_tokens_off_the_command_line() {
        let d = Domain {
            name: "memd-1".into(),
            port: 5601,
            mem_mib: 1024,
            kernel: "/k/memd-kernel".into(),
            dir: "/x/a'b".into(),
            kvm: false,
            cmdline: "memd.log=info".into(),
            uid: 0,
            gid: 0,
            hotplug_mib: None,
        };
        let x = d.xml();
        assert!(x.contains("<domain type='qemu'"));
        assert!(x.contains("<cmdline>memd.port=5601 memd.log=info</cmdline>"));
        assert!(x.contains("<entry name='opt/memd/token' file='/x/a&apos;b/token'/>"));
        assert!(x.contains("hostfwd=tcp:127.0.0.1:5601-:5601"));
        assert!(x.contains("<memd:addr>127.0.0.1:5601</memd:addr>"));
        assert!(x.contains("<stats period='2'/>"));
        assert!(!x.contains("token=") && !x.contains("memd.token"));
        assert!(!x.contains("virtio-mem") && !x.contains("maxMemory"));
        let x = Domain {
            hotplug_mib: Some(2048),
            ..d
        }
        .xml();
        assert!(x.contains("<maxMemory slots='1' unit='MiB'>3072</maxMemory>"));
        assert!(x.contains("<cell id='0' cpus='0' memory='1024' unit='MiB'/>"));
        assert!(x.contains("<memory model='virtio-mem'>"));
        assert!(x.contains("<size unit='MiB'>2048</size>"));
        assert!(x.contains("<requested unit='MiB'>0</requested>"));
    }
}
