//! Architecture-specific parts: register layout, the syscall instruction, extended
//! (vector) state and the kernel's syscall-restart conventions.
//!
//! Only x86-64 exists today; aarch64 would add `aarch64.rs` with the same items.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("stasis supports only x86-64 for now; add an arch module for this target");
