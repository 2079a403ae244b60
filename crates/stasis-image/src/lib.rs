//! The on-disk checkpoint image of stasis.
//!
//! A checkpoint directory holds numbered checkpoints; each is a directory with a
//! checksummed `manifest.json`, the metadata `checkpoint.json` (plain versioned structs
//! in [`model`]), and page-aligned data files. See docs/IMAGE-FORMAT.md.
//!
//! [`codec`] compresses page files frame by frame.
//!
//! [`store`] owns the directory layout: writing aside and publishing by rename, finding
//! the newest complete checkpoint, verifying checksums before anything is restored,
//! locking against concurrent writers and pruning old checkpoints.

pub mod codec;
pub mod model;
pub mod store;

pub use codec::Compression;
pub use model::*;
pub use store::{
    CheckpointReader, CheckpointWriter, DataWriter, DirLock, ImageError, ImageResult,
    PositionedFile,
};

/// Image format version written by this build. Readers refuse other versions.
pub const FORMAT_VERSION: u32 = 2;

/// Value of the `format` field of every manifest.
pub const FORMAT_NAME: &str = "stasis-image";

/// Size of one checksummed chunk of a data file.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// Page size the images are laid out with.
pub const PAGE_SIZE: u64 = 4096;
