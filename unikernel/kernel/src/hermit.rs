//! The memory calls of the hermit-abi ABI, exported under the names
//! hermit-abi's `extern` block links against (`sys_malloc`, `sys_alloc`,
//! `sys_alloc_zeroed`, `sys_realloc`, `sys_free`, `sys_dealloc`,
//! `sys_getpagesize`), backed by memd-mm through the global allocator, so
//! code written against hermit-abi links into memd.
//!
//! As in Hermit, a zero size or an invalid layout (alignment not a power of
//! two, size overflowing when rounded) returns null and frees nothing.

#![allow(unsafe_code)]

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

use crate::ALLOC;

fn layout(size: usize, align: usize) -> Option<Layout> {
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, align).ok()
}

#[no_mangle]
pub extern "C" fn sys_malloc(size: usize, align: usize) -> *mut u8 {
    sys_alloc(size, align)
}

#[no_mangle]
pub extern "C" fn sys_alloc(size: usize, align: usize) -> *mut u8 {
    match layout(size, align) {
        // SAFETY: the layout has a non-zero size.
        Some(l) => unsafe { ALLOC.alloc(l) },
        None => null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn sys_alloc_zeroed(size: usize, align: usize) -> *mut u8 {
    match layout(size, align) {
        // SAFETY: the layout has a non-zero size.
        Some(l) => unsafe { ALLOC.alloc_zeroed(l) },
        None => null_mut(),
    }
}

/// # Safety
/// `ptr` must come from one of these functions with the same `size` and
/// `align`, and not have been freed.
#[no_mangle]
pub unsafe extern "C" fn sys_realloc(
    ptr: *mut u8,
    size: usize,
    align: usize,
    new_size: usize,
) -> *mut u8 {
    match (layout(size, align), layout(new_size, align)) {
        // SAFETY: forwarded to the caller; `new_size` is non-zero and forms a
        // valid layout with `align`.
        (Some(l), Some(_)) if !ptr.is_null() => unsafe { ALLOC.realloc(ptr, l, new_size) },
        _ => null_mut(),
    }
}

/// # Safety
/// As for `sys_realloc`.
#[no_mangle]
pub unsafe extern "C" fn sys_free(ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { sys_dealloc(ptr, size, align) }
}

/// # Safety
/// As for `sys_realloc`.
#[no_mangle]
pub unsafe extern "C" fn sys_dealloc(ptr: *mut u8, size: usize, align: usize) {
    if let (Some(l), false) = (layout(size, align), ptr.is_null()) {
        // SAFETY: forwarded to the caller.
        unsafe { ALLOC.dealloc(ptr, l) }
    }
}

#[no_mangle]
pub extern "C" fn sys_getpagesize() -> i32 {
    memd_mm::PAGE_SIZE as i32
}

/// Self-test: the calls above, made through hermit-abi's own declarations.
pub fn selftest() -> Result<(), &'static str> {
    // SAFETY: these are our own exports (above), called with the contracts
    // they document: every pointer is freed once, with its size and align.
    unsafe {
        if hermit_abi::getpagesize() != 4096 {
            return Err("hermit getpagesize != 4096");
        }
        if !hermit_abi::malloc(0, 8).is_null() || !hermit_abi::alloc(16, 3).is_null() {
            return Err("hermit malloc accepted a zero size or a bad alignment");
        }
        for &(size, align) in &[
            (1usize, 1usize),
            (24, 8),
            (100, 16),
            (4096, 4096),
            (5000, 64),
            (1 << 20, 4096),
        ] {
            let p = hermit_abi::malloc(size, align);
            if p.is_null() || !(p as usize).is_multiple_of(align) {
                return Err("hermit malloc failed or misaligned");
            }
            core::ptr::write_bytes(p, 0xa5, size);
            let q = hermit_abi::realloc(p, size, align, size * 3);
            if q.is_null() || !(q as usize).is_multiple_of(align) {
                return Err("hermit realloc failed or misaligned");
            }
            if (0..size).any(|i| *q.add(i) != 0xa5) {
                return Err("hermit realloc lost the contents");
            }
            hermit_abi::free(q, size * 3, align);

            let z = hermit_abi::alloc_zeroed(size, align);
            if z.is_null() || (0..size).any(|i| *z.add(i) != 0) {
                return Err("hermit alloc_zeroed failed or not zeroed");
            }
            // Dirty it so a later zeroed allocation of the same block is a real test.
            core::ptr::write_bytes(z, 0x5a, size);
            hermit_abi::dealloc(z, size, align);
            let z = hermit_abi::alloc_zeroed(size, align);
            if z.is_null() || (0..size).any(|i| *z.add(i) != 0) {
                return Err("hermit alloc_zeroed returned dirty memory");
            }
            hermit_abi::dealloc(z, size, align);

            let a = hermit_abi::alloc(size, align);
            if a.is_null() {
                return Err("hermit alloc failed");
            }
            hermit_abi::dealloc(a, size, align);
        }
    }
    Ok(())
}
