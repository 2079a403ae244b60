//! Compression of page files: each part file of a compressed page file is a sequence
//! of independently compressed frames, one per [`crate::CHUNK_SIZE`] bytes of the
//! logical part (the last may be shorter), so that any page can be read by
//! decompressing one frame and frames are compressed and decompressed in parallel.
//! The end offset of every frame is kept in the metadata ([`crate::PageFiles`]).

use serde::{Deserialize, Serialize};

/// How the frames of a page file are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is (zero pages are holes).
    #[default]
    None,
    /// Zstandard (RFC 8878) frames, level [`ZSTD_LEVEL`].
    Zstd,
    /// LZ4 block format (no frame header; the decompressed size is known).
    Lz4,
}

/// The zstd level used: its fastest levels keep up with several GB/s per core on
/// page data while still squeezing zeros and text well.
pub const ZSTD_LEVEL: i32 = 1;

impl Compression {
    /// Compresses one frame.
    pub fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL),
            Compression::Lz4 => Ok(lz4_flex::block::compress(data)),
        }
    }

    /// Decompresses one frame of `len` bytes into `out` (resized to `len`).
    pub fn decompress(self, frame: &[u8], len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.resize(len, 0);
        let n = match self {
            Compression::None => {
                let n = frame.len().min(len);
                out[..n].copy_from_slice(&frame[..n]);
                n
            }
            Compression::Zstd => zstd::bulk::decompress_to_buffer(frame, out)?,
            Compression::Lz4 => lz4_flex::block::decompress_into(frame, out)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        };
        if n != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame decompressed to {n} bytes instead of {len}"),
            ));
        }
        Ok(())
    }

    /// The name used on the command line and in `inspect`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            _ => Err(format!("unknown compression {s:?} (none, zstd or lz4)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate().take(300_000) {
            *b = (i * 7 % 251) as u8;
        }
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let z = c.compress(&data).unwrap();
            if c != Compression::None {
                assert!(z.len() < data.len() / 2, "{c:?} compressed to {}", z.len());
            }
            let mut out = Vec::new();
            c.decompress(&z, data.len(), &mut out).unwrap();
            assert_eq!(out, data, "{c:?}");
            // A damaged frame is an error, never a panic.
            let mut bad = z.clone();
            bad.truncate(z.len() / 2);
            assert!(c.decompress(&bad, data.len(), &mut out).is_err(), "{c:?}");
        }
    }
}
