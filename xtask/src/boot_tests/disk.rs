//! The served cases' disk: a sparse image per guest, and virtio-blk
//! through the service (a DMA buffer written to it and read back).

use std::path::{Path, PathBuf};

/// A sparse disk image removed when dropped.
pub(super) struct TempDisk {
    pub path: PathBuf,
    /// QEMU's QMP socket for the same guest.
    pub qmp: PathBuf,
}

impl TempDisk {
    pub fn new(name: &str) -> std::io::Result<TempDisk> {
        let path =
            std::env::temp_dir().join(format!("memd-boot-test-{}-{name}.img", std::process::id()));
        std::fs::File::create(&path)?.set_len(DISK_BYTES)?;
        let qmp = path.with_extension("qmp");
        Ok(TempDisk { path, qmp })
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.qmp);
    }
}

/// The size of a case's disk image.
const DISK_BYTES: u64 = 32 << 20;

/// virtio-blk through the service: a 1 MiB DMA buffer filled with a
/// pattern is written at sector 8 and read back into a second buffer; the
/// checksums match, the image file on the host holds the data, and a request
/// past the end of the disk is refused.
pub(super) fn disk_check(port: u16, token: &str, image: &Path) -> Result<(), String> {
    use memd_client::wire::DmaMask;
    use memd_client::{Client, Options};
    use std::io::{Read, Seek, SeekFrom};

    let mut c = Client::connect(&Options::new(format!("127.0.0.1:{port}"), token))
        .map_err(|e| format!("connect: {e}"))?;
    let status = c.status().map_err(|e| format!("status: {e}"))?;
    if !status.block_device {
        return Err("status reports no block device, yet a virtio-blk disk is attached".into());
    }
    const LEN: u64 = 1 << 20;
    let a = c
        .dma_alloc(LEN, 4096, DmaMask::Bits64)
        .map_err(|e| format!("dma_alloc: {e}"))?;
    let b = c
        .dma_alloc(LEN, 4096, DmaMask::Bits64)
        .map_err(|e| format!("dma_alloc: {e}"))?;
    c.dma_fill(a.handle, 0x5eed)
        .map_err(|e| format!("dma_fill: {e}"))?;
    let want = c
        .dma_checksum(a.handle, 0, 0)
        .map_err(|e| format!("checksum: {e}"))?;
    c.dma_write_disk(a.handle, 8)
        .map_err(|e| format!("dma_write_disk: {e}"))?;
    c.dma_read_disk(b.handle, 8)
        .map_err(|e| format!("dma_read_disk: {e}"))?;
    let got = c
        .dma_checksum(b.handle, 0, 0)
        .map_err(|e| format!("checksum: {e}"))?;
    if got != want {
        return Err(format!(
            "disk round trip: checksum {got:#x}, wrote {want:#x}"
        ));
    }
    let first = c
        .dma_read(a.handle, 0, 512)
        .map_err(|e| format!("dma_read: {e}"))?;
    let mut on_disk = vec![0u8; 512];
    let mut f = std::fs::File::open(image).map_err(|e| format!("opening the image: {e}"))?;
    f.seek(SeekFrom::Start(8 * 512))
        .and_then(|_| f.read_exact(&mut on_disk))
        .map_err(|e| format!("reading the image: {e}"))?;
    if on_disk != first || first.iter().all(|&x| x == 0) {
        return Err("the image file does not hold what the guest wrote at sector 8".into());
    }
    let last_sector = DISK_BYTES / 512 - 1;
    if c.dma_write_disk(a.handle, last_sector).is_ok() {
        return Err("a write past the end of the disk was accepted".into());
    }
    c.dma_free(a.handle).map_err(|e| format!("dma_free: {e}"))?;
    c.dma_free(b.handle).map_err(|e| format!("dma_free: {e}"))?;
    Ok(())
}
