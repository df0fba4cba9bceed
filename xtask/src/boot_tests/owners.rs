//! More than 255 clients at once: each is charged under an owner id of its
//! own, and what the clients view and `memctl clients` show for it is
//! exact; the caches they hold together fill no table.

use memd_client::wire::{CacheSpec, Ctor, Gfp, SlabFlags, VIEW_PAGE};
use memd_client::{Client, Options};

use super::memctl::memctl;
use crate::tokens::GuestTokens;

/// Clients held at once: more than 255, within the 264 slots of a 1 GiB
/// guest (the operator's connection and memctl's take two more).
const CLIENTS: usize = 258;

/// Connects [`CLIENTS`] clients; client `i` holds `i % 4 + 1` pages and two
/// slab caches. The clients view, over memd-client and through `memctl
/// clients --json`, must show each one's owner id (all different) charged
/// with exactly its pages, and the slab listing, fetched page by page,
/// every cache.
pub(super) fn owners_check(port: u16, tokens: &GuestTokens) -> Result<(), String> {
    let addr = format!("127.0.0.1:{port}");
    let mut main = Client::connect(&Options::new(addr.clone(), &tokens.operator))
        .map_err(|e| format!("connect: {e}"))?;
    let opts = Options::new(addr, &tokens.client);
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut c = Client::connect(&opts).map_err(|e| format!("client {i} of {CLIENTS}: {e}"))?;
        for _ in 0..i % 4 + 1 {
            c.alloc_pages(0, Gfp::KERNEL)
                .map_err(|e| format!("client {i}: alloc_pages: {e}"))?;
        }
        for size in [40 + i as u32, 2000 + i as u32] {
            c.cache_create(CacheSpec {
                name: format!("owners-{i}"),
                size,
                align: 0,
                flags: SlabFlags::NONE,
                ctor: Ctor::None,
            })
            .map_err(|e| format!("client {i}: cache-create: {e}"))?;
        }
        clients.push((c.hello().conn, (i % 4 + 1) as u64, c));
    }
    let view = main.clients().map_err(|e| format!("clients: {e}"))?;
    let mut owners: Vec<u64> = view.iter().map(|l| l.owner).collect();
    owners.sort_unstable();
    owners.dedup();
    if owners.len() != view.len() || view.len() <= CLIENTS {
        return Err(format!(
            "{} connections listed with {} distinct owner ids",
            view.len(),
            owners.len()
        ));
    }
    for (conn, pages, _) in &clients {
        match view.iter().find(|l| l.conn == *conn) {
            Some(l) if l.charged_pages == *pages => {}
            other => {
                return Err(format!(
                    "client {conn}: want {pages} charged pages, the view has {other:?}"
                ))
            }
        }
    }
    let env = [("MEMD_TOKEN", tokens.client.as_str())];
    let (code, out, err) = memctl(port, &env, &["--json", "clients"], "")?;
    if code != 0 {
        return Err(format!("memctl clients: exit {code}: {err}"));
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out).map_err(|e| format!("memctl clients --json: {e}"))?;
    for (conn, pages, _) in &clients {
        let row = rows.iter().find(|r| r["conn"].as_u64() == Some(*conn));
        if row.and_then(|r| r["charged_pages"].as_u64()) != Some(*pages) {
            return Err(format!(
                "memctl clients: client {conn} wants {pages} charged pages, has {row:?}"
            ));
        }
    }
    let slabs = main.slabinfo().map_err(|e| format!("slabinfo: {e}"))?;
    let ours = slabs
        .iter()
        .filter(|s| s.name.starts_with("owners-"))
        .count();
    if slabs.len() <= VIEW_PAGE || ours != 2 * CLIENTS {
        return Err(format!(
            "slabinfo lists {} caches, {ours} of the clients' (want {})",
            slabs.len(),
            2 * CLIENTS
        ));
    }
    Ok(())
}
