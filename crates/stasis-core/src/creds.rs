//! Credentials: user and group IDs, supplementary groups, capability sets and
//! no_new_privs.
//!
//! Dump: read from `/proc/PID/status` (IDs as seen from the user namespace stasis runs
//! in: the job's own under `stasis run`, where the invoking user keeps their own ID).
//!
//! Restore: a restored process is a fork of the restorer and starts with its
//! credentials (under `stasis run`/`restart` the namespace init's: the user's IDs and
//! every capability of the job's user namespace). Near the end of its rebuild, once
//! nothing else needs those capabilities (PR_SET_MM_MAP does), the process takes its
//! saved credentials by injected syscalls: `setgroups`, `setresgid`, `setresuid` where
//! they differ (the namespace maps only the invoking user unless that user is root,
//! so an image claiming other IDs fails to restore instead of gaining anything), after
//! the capability bounding set is narrowed; then the ambient set is cleared, `capset` lowers the
//! other sets to the saved ones, the saved ambient capabilities are raised again, and
//! no_new_privs is set. Capabilities are only ever dropped: a restored process never
//! holds more than the restorer.

use crate::error::{Error, Result};
use crate::inject::{Injector, Scratch};
use stasis_image::Creds;

const PR_SET_KEEPCAPS: u64 = 8;
const PR_CAPBSET_DROP: u64 = 24;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Parses the credential lines of a `/proc/PID/status` text.
pub fn parse_status(pid: i32, status: &str) -> Result<Creds> {
    let field = |name: &str| -> Result<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| Error::Unsupported {
                pid,
                what: format!("a /proc/PID/status without {name}"),
            })
    };
    let ids = |name: &str| -> Result<[u32; 4]> {
        let v: Vec<u32> = field(name)?
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        v.try_into().map_err(|_| Error::Unsupported {
            pid,
            what: format!("an unreadable {name} line in /proc/PID/status"),
        })
    };
    let caps = |name: &str| -> Result<u64> {
        let v = field(name)?;
        u64::from_str_radix(v, 16).map_err(|_| Error::Unsupported {
            pid,
            what: format!("an unreadable {name} {v:?} in /proc/PID/status"),
        })
    };
    Ok(Creds {
        uids: ids("Uid:")?,
        gids: ids("Gid:")?,
        groups: field("Groups:")?
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect(),
        cap_inheritable: caps("CapInh:")?,
        cap_permitted: caps("CapPrm:")?,
        cap_effective: caps("CapEff:")?,
        cap_bounding: caps("CapBnd:")?,
        // Absent before Linux 4.3 (no ambient set).
        cap_ambient: caps("CapAmb:").unwrap_or(0),
        no_new_privs: field("NoNewPrivs:").is_ok_and(|v| v == "1"),
    })
}

/// The credentials of process `pid`.
pub fn dump(pid: i32) -> Result<Creds> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ESRCH) {
            Error::Gone { pid }
        } else {
            Error::Io {
                pid,
                context: "reading /proc/PID/status".into(),
                source: e,
            }
        }
    })?;
    parse_status(pid, &text)
}

/// Gives new process `pid` (stopped; `inj` runs syscalls in it) its saved credentials.
pub fn restore(inj: &Injector, pid: i32, saved: &Creds, scratch: &Scratch) -> Result<()> {
    let now = dump(pid)?;
    let fail = |what: String, r: i64| Error::Restore {
        pid,
        msg: format!(
            "{what}: {} (a restart maps only the restarting user's own IDs unless run by root)",
            std::io::Error::from_raw_os_error(-r as i32)
        ),
    };
    // The bounding set first: dropping from it needs CAP_SETPCAP in the effective set,
    // which a change of user ID clears.
    for cap in bits(now.cap_bounding & !saved.cap_bounding) {
        inj.call(
            &format!("prctl(PR_CAPBSET_DROP, {cap})"),
            libc::SYS_prctl,
            &[PR_CAPBSET_DROP, cap as u64, 0, 0, 0],
        )?;
    }
    let ids_change = now.uids != saved.uids || now.gids != saved.gids;
    if ids_change {
        // Keep the permitted capabilities across a change away from uid 0: the sets are
        // lowered to the saved ones below, not cleared by the kernel.
        inj.call(
            "prctl(PR_SET_KEEPCAPS, 1)",
            libc::SYS_prctl,
            &[PR_SET_KEEPCAPS, 1, 0, 0, 0],
        )?;
    }
    if now.groups != saved.groups {
        let bytes: Vec<u8> = saved.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
        scratch.write(&bytes)?;
        let r = inj.raw(
            libc::SYS_setgroups,
            &[saved.groups.len() as u64, scratch.addr],
        )?;
        if r < 0 {
            return Err(fail(
                format!("it had supplementary groups {:?}", saved.groups),
                r,
            ));
        }
    }
    if now.gids != saved.gids {
        let [r, e, s, _] = saved.gids;
        let res = inj.raw(libc::SYS_setresgid, &[r as u64, e as u64, s as u64])?;
        if res < 0 {
            let [u, eu, su, _] = saved.uids;
            return Err(fail(
                format!("it ran as uid {u}/{eu}/{su}, gid {r}/{e}/{s}"),
                res,
            ));
        }
        inj.raw(libc::SYS_setfsgid, &[saved.gids[3] as u64])?;
    }
    if now.uids != saved.uids {
        let [r, e, s, _] = saved.uids;
        let res = inj.raw(libc::SYS_setresuid, &[r as u64, e as u64, s as u64])?;
        if res < 0 {
            let [g, eg, sg, _] = saved.gids;
            return Err(fail(
                format!("it ran as uid {r}/{e}/{s}, gid {g}/{eg}/{sg}"),
                res,
            ));
        }
        inj.raw(libc::SYS_setfsuid, &[saved.uids[3] as u64])?;
    }
    if ids_change {
        inj.call(
            "prctl(PR_SET_KEEPCAPS, 0)",
            libc::SYS_prctl,
            &[PR_SET_KEEPCAPS, 0, 0, 0, 0],
        )?;
    }
    let now = if ids_change { dump(pid)? } else { now };
    if now.cap_ambient != 0 {
        inj.call(
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            libc::SYS_prctl,
            &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0],
        )?;
    }
    if (now.cap_effective, now.cap_permitted, now.cap_inheritable)
        != (
            saved.cap_effective,
            saved.cap_permitted,
            saved.cap_inheritable,
        )
    {
        let gained =
            (saved.cap_permitted & !now.cap_permitted) | (saved.cap_effective & !now.cap_permitted);
        if gained != 0 {
            return Err(Error::Restore {
                pid,
                msg: format!(
                    "it held capabilities {gained:#x} that the restarting user does not have here"
                ),
            });
        }
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&CAP_VERSION_3.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // pid 0: the caller
        for half in [0, 32] {
            for set in [
                saved.cap_effective,
                saved.cap_permitted,
                saved.cap_inheritable,
            ] {
                b.extend_from_slice(&((set >> half) as u32).to_le_bytes());
            }
        }
        scratch.write(&b)?;
        let r = inj.raw(libc::SYS_capset, &[scratch.addr, scratch.addr + 8])?;
        if r < 0 {
            return Err(fail(
                format!(
                    "setting its capabilities (effective {:#x}, permitted {:#x}, inheritable {:#x})",
                    saved.cap_effective, saved.cap_permitted, saved.cap_inheritable
                ),
                r,
            ));
        }
    }
    for cap in bits(saved.cap_ambient) {
        let r = inj.raw(
            libc::SYS_prctl,
            &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap as u64, 0, 0],
        )?;
        if r < 0 {
            return Err(fail(format!("raising ambient capability {cap}"), r));
        }
    }
    if saved.no_new_privs && !now.no_new_privs {
        inj.call(
            "prctl(PR_SET_NO_NEW_PRIVS, 1)",
            libc::SYS_prctl,
            &[PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// The numbers of the bits set in `mask`.
fn bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| mask & (1u64 << b) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let text = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t10\t11\t12\t13\n\
                    Groups:\t10 27 \nCapInh:\t0000000000000000\nCapPrm:\t00000000000000ff\n\
                    CapEff:\t0000000000000001\nCapBnd:\t000001ffffffffff\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let c = parse_status(1, text).unwrap();
        assert_eq!(c.uids, [1000, 1001, 1002, 1003]);
        assert_eq!(c.gids, [10, 11, 12, 13]);
        assert_eq!(c.groups, vec![10, 27]);
        assert_eq!(c.cap_permitted, 0xff);
        assert_eq!(c.cap_effective, 1);
        assert_eq!(c.cap_bounding, 0x1ff_ffff_ffff);
        assert!(c.no_new_privs);
        assert_eq!(bits(0b1010).collect::<Vec<_>>(), vec![1, 3]);
    }
}
