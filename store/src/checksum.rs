//! CRC32C (Castagnoli): what the store verifies per object or part, and what the manifest records
//! per file for restore to verify end to end.
//!
//! Computed with `crc-fast` (already in the tree through the SDK's `aws-smithy-checksums`), which
//! folds with carry-less multiplication (VPCLMULQDQ/AVX-512, PCLMULQDQ, ARM PMULL) where the CPU
//! has it: twice the `crc32c` crate's speed on the bench machine's EPYC (2 GiB in 256 KiB chunks:
//! 34 ms against 68 ms). Every upload reads each byte through it once and every restore once.

use crc_fast::{CrcAlgorithm, Digest};

/// CRC32C's final XOR; the running state is the finished CRC with it undone.
const XOROUT: u32 = 0xffff_ffff;

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// CRC32C of the bytes that gave `crc` followed by `data` (0 for no bytes yet).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut digest = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(crc ^ XOROUT));
    digest.update(data);
    // A CRC-32 state never leaves the low 32 bits.
    (digest.finalize() & u64::from(u32::MAX)) as u32
}

/// CRC32C of consecutive pieces from each piece's CRC32C and length, in order.
pub fn crc32c_concat(pieces: impl IntoIterator<Item = (u32, u64)>) -> u32 {
    pieces.into_iter().fold(0, |acc, (crc, len)| {
        let combined = crc_fast::checksum_combine(
            CrcAlgorithm::Crc32Iscsi,
            u64::from(acc),
            u64::from(crc),
            len,
        );
        (combined & u64::from(u32::MAX)) as u32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn appending_in_pieces_equals_the_reference_crate_at_every_split() {
        let data = sample(70_001);
        let reference = crc32c::crc32c(&data);
        for split in [0, 1, 7, 63, 64, 65, 4096, 35_000, 70_000, 70_001] {
            let (a, b) = data.split_at(split);
            assert_eq!(
                crc32c_append(crc32c_append(0, a), b),
                reference,
                "split {split}"
            );
        }
    }

    #[test]
    fn concatenating_piece_crcs_equals_the_crc_of_the_whole() {
        let data = sample(1 << 20);
        let pieces = [0usize, 1, 300_000, 9, 0, 748_566];
        assert_eq!(pieces.iter().sum::<usize>(), data.len());
        let mut at = 0;
        let crcs: Vec<(u32, u64)> = pieces
            .iter()
            .map(|&len| {
                let piece = &data[at..at + len];
                at += len;
                (crc32c(piece), len as u64)
            })
            .collect();
        assert_eq!(crc32c_concat(crcs), crc32c::crc32c(&data));
        assert_eq!(crc32c_concat([]), 0);
    }
}
