//! Memory: mappings and their pages, in four parts.
//!
//! - [`layout`]: the mappings of a process at dump time and their VM flags, and what
//!   is refused;
//! - [`plan`](mod@plan): which pages are saved (from pagemap), as runs placed in the page file;
//! - [`pages`]: copying those pages out of the process and writing the page file;
//! - [`restore`]: recreating the mappings in the restored process and filling their
//!   pages, and moving its vdso block.
//!
//! Everything public is re-exported here, so `crate::memory::X` names each item.

pub mod layout;
pub mod pages;
pub mod part;
pub mod plan;
pub mod restore;

pub use layout::*;
pub use pages::*;
pub use plan::*;
pub use restore::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space() {
        let used = [(0x10000, 0x20000), (0x22000, 0x30000)];
        assert_eq!(find_free(&used, 0x1000, 0x10000), Some(0x31000));
        assert_eq!(find_free(&used, 0x1000, 0x1000), Some(0x1000));
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
