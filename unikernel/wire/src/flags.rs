//! Flag sets carried on the wire: GFP flags, slab cache flags, DMA masks.
//!
//! They are memd-mm's own types, which derive serde for the protocol: one
//! definition, with Linux's names, parsing and printing (`KERNEL|ZERO`).
//! A decoded flag set may hold any bits; the service refuses unknown ones
//! (and the kernel-only `Gfp::MEMALLOC`) with `EINVAL`.

pub use memd_mm::{DmaMask, Gfp, SlabFlags};
