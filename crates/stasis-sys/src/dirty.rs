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

/// Page categories of PAGEMAP_SCAN (`PAGE_IS_*` in linux/fs.h).
pub mod category {
    pub const WPALLOWED: u64 = 1 << 0;
    pub const WRITTEN: u64 = 1 << 1;
    pub const FILE: u64 = 1 << 2;
    pub const PRESENT: u64 = 1 << 3;
    pub const SWAPPED: u64 = 1 << 4;
    pub const PFNZERO: u64 = 1 << 5;
}

/// What [`scan`] selects and reports (the masks of `struct pm_scan_arg`): a page
/// matches when its categories, with `inverted` flipped, contain all of `all` and
/// (if `any` is not 0) one of `any`. `report` is the categories each range carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanMasks {
    pub inverted: u64,
    pub all: u64,
    pub any: u64,
    pub report: u64,
}

/// PAGEMAP_SCAN over `[start, end)` of `/proc/PID/pagemap` (open as `pagemap`): the
/// ranges of matching pages with their reported categories, in address order
/// (neighbouring pages of equal categories come as one range). With `reprotect`, the
/// matching pages are write-protected again in the same walk (PM_SCAN_WP_MATCHING,
/// asynchronous uffd-wp tracking must be armed: PM_SCAN_CHECK_WPASYNC).
pub fn scan(
    pagemap: i32,
    start: u64,
    end: u64,
    masks: ScanMasks,
    reprotect: bool,
) -> Result<Vec<(u64, u64, u64)>> {
    let flags = if reprotect {
        PM_SCAN_CHECK_WPASYNC | PM_SCAN_WP_MATCHING
    } else {
        0
    };
    let mut out = Vec::new();
    let mut at = start;
    let mut regions = vec![[0u64; 3]; 512];
    while at < end {
        let (n, walk_end) = scan_once(pagemap, flags, at, end, &mut regions, 0, masks)?;
        out.extend(regions[..n].iter().map(|r| (r[0], r[1], r[2])));
        if walk_end <= at {
            break;
        }
        at = walk_end;
    }
    Ok(out)
}

/// PAGEMAP_SCAN for the first matching page of `[start, end)` (the walk stops
/// there): its range, if any.
pub fn scan_first(
    pagemap: i32,
    start: u64,
    end: u64,
    masks: ScanMasks,
) -> Result<Option<(u64, u64)>> {
    let mut region = [[0u64; 3]; 1];
    let (n, _) = scan_once(pagemap, 0, start, end, &mut region, 1, masks)?;
    Ok((n > 0).then_some((region[0][0], region[0][1])))
}

/// One PAGEMAP_SCAN ioctl (`struct pm_scan_arg`) over `[start, end)`, reporting into
/// `regions` (at most `max_pages` pages, 0: no limit): how many regions it filled,
/// and where the walk ended.
fn scan_once(
    pagemap: i32,
    flags: u64,
    start: u64,
    end: u64,
    regions: &mut [[u64; 3]],
    max_pages: u64,
    masks: ScanMasks,
) -> Result<(usize, u64)> {
    let mut arg = [
        96u64,
        flags,
        start,
        end,
        0, // walk_end (out)
        regions.as_mut_ptr() as u64,
        regions.len() as u64,
        max_pages,
        masks.inverted,
        masks.all,
        masks.any,
        masks.report,
    ];
    let n = ioctl(
        pagemap,
        PAGEMAP_SCAN,
        arg.as_mut_ptr().cast(),
        "PAGEMAP_SCAN",
    )? as usize;
    Ok((n.min(regions.len()), arg[4]))
}

/// PAGEMAP_SCAN: the page ranges of `[start, end)` written since they were
/// write-protected. With `reprotect`, the written pages are write-protected again in
/// the same walk, which re-arms tracking at the cost of the written pages only.
pub fn written_ranges(
    pagemap: i32,
    start: u64,
    end: u64,
    reprotect: bool,
) -> Result<Vec<(u64, u64)>> {
    let masks = ScanMasks {
        all: category::WRITTEN,
        report: category::WRITTEN,
        ..ScanMasks::default()
    };
    Ok(scan(pagemap, start, end, masks, reprotect)?
        .into_iter()
        .map(|(s, e, _)| (s, e))
        .collect())
}
