//! Dirty-page tracking without soft-dirty: userfaultfd write-protection in
//! asynchronous mode (UFFD_FEATURE_WP_ASYNC) and the PAGEMAP_SCAN ioctl on
//! `/proc/PID/pagemap` (Linux 6.7+), see userfaultfd(2) and
//! Documentation/admin-guide/mm/pagemap.rst.
//!
//! The userfaultfd must belong to the target's mm (created by the target itself);
//! a copy taken with pidfd_getfd(2) serves for the ioctls.

use crate::{Result, SysError};

const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// userfaultfd(2) flag: handle user-mode faults only (allowed unprivileged).
pub const UFFD_USER_MODE_ONLY: u64 = 1;

const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

fn ioctl(fd: i32, req: libc::c_ulong, arg: *mut u8, what: &'static str) -> Result<i64> {
    // SAFETY: callers pass a pointer to a live, correctly sized argument struct.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        return Err(SysError::last(what, 0));
    }
    Ok(i64::from(r))
}

/// UFFDIO_API with asynchronous write-protection. (Not UFFD_FEATURE_WP_UNPOPULATED:
/// a page populated later has no protection and so reads as written anyway, and
/// protecting unpopulated pages of a huge sparse mapping would fill its page tables.)
pub fn uffd_enable_wp_async(uffd: i32) -> Result<()> {
    let mut api = [UFFD_API, UFFD_FEATURE_WP_ASYNC, 0u64];
    ioctl(
        uffd,
        UFFDIO_API,
        api.as_mut_ptr().cast(),
        "UFFDIO_API(WP_ASYNC)",
    )
    .map(drop)
}

/// UFFDIO_REGISTER of a range for write-protection tracking.
pub fn uffd_register_wp(uffd: i32, start: u64, len: u64) -> Result<()> {
    let mut reg = [start, len, UFFDIO_REGISTER_MODE_WP, 0u64];
    ioctl(
        uffd,
        UFFDIO_REGISTER,
        reg.as_mut_ptr().cast(),
        "UFFDIO_REGISTER(WP)",
    )
    .map(drop)
}

/// UFFDIO_WRITEPROTECT of a range: the next write to each page marks it written.
pub fn uffd_write_protect(uffd: i32, start: u64, len: u64) -> Result<()> {
    let mut wp = [start, len, UFFDIO_WRITEPROTECT_MODE_WP];
    ioctl(
        uffd,
        UFFDIO_WRITEPROTECT,
        wp.as_mut_ptr().cast(),
        "UFFDIO_WRITEPROTECT",
    )
    .map(drop)
}

/// PAGEMAP_SCAN: the page ranges of `[start, end)` written since they were
/// write-protected. `pagemap` is an open `/proc/PID/pagemap`. With `reprotect`, the
/// written pages are write-protected again in the same walk (PM_SCAN_WP_MATCHING),
/// which re-arms tracking at the cost of the written pages only.
pub fn written_ranges(
    pagemap: i32,
    start: u64,
    end: u64,
    reprotect: bool,
) -> Result<Vec<(u64, u64)>> {
    let flags = PM_SCAN_CHECK_WPASYNC | if reprotect { PM_SCAN_WP_MATCHING } else { 0 };
    let mut out = Vec::new();
    let mut at = start;
    let mut regions = vec![[0u64; 3]; 512];
    while at < end {
        // struct pm_scan_arg
        let mut arg = [
            96u64,
            flags,
            at,
            end,
            0, // walk_end (out)
            regions.as_mut_ptr() as u64,
            regions.len() as u64,
            0, // max_pages
            0, // category_inverted
            PAGE_IS_WRITTEN,
            0,
            PAGE_IS_WRITTEN,
        ];
        let n = ioctl(
            pagemap,
            PAGEMAP_SCAN,
            arg.as_mut_ptr().cast(),
            "PAGEMAP_SCAN",
        )? as usize;
        out.extend(regions[..n].iter().map(|r| (r[0], r[1])));
        let walk_end = arg[4];
        if walk_end <= at {
            break;
        }
        at = walk_end;
    }
    Ok(out)
}
