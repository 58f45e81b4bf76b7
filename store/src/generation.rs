//! Generation ids: one per committed checkpoint.
//!
//! A single pod's generation is named by the UTC start time with milliseconds plus a random
//! suffix, `20261124T021116123Z-3fa9c1d2`: fixed width, so a key listing (lexical order) is
//! time order, and two sidecars starting in the same millisecond still get distinct ids.
//!
//! A multi-pod generation is named by the checkpoint's step, `step-000000001055`: every rank
//! reads the same step from its own checkpoint and so agrees on the id without talking to the
//! others. Fixed width too, so key order is step order.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use time::OffsetDateTime;

/// Length of `YYYYMMDDTHHMMSSmmmZ-xxxxxxxx`.
const ID_LEN: usize = 28;
const TIME_LEN: usize = 19;
/// `step-` and the step's digits: 12 of them hold a trillion steps, beyond any training run.
const STEP_PREFIX: &str = "step-";
const STEP_DIGITS: usize = 12;
/// The largest step a multi-pod id holds.
pub const MAX_STEP: u64 = 999_999_999_999;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(String);

impl Generation {
    /// A new id for an upload starting now.
    pub fn new() -> Generation {
        Generation::at(OffsetDateTime::now_utc(), rand::rng().random())
    }

    fn at(time: OffsetDateTime, suffix: u32) -> Generation {
        let t = time.to_offset(time::UtcOffset::UTC);
        Generation(format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}{:03}Z-{suffix:08x}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond(),
        ))
    }

    /// The id of a multi-pod generation holding `step`.
    pub fn for_step(step: u64) -> Result<Generation, String> {
        if step > MAX_STEP {
            return Err(format!(
                "step {step} is beyond the {MAX_STEP} a generation id holds"
            ));
        }
        Ok(Generation(format!("{STEP_PREFIX}{step:0STEP_DIGITS$}")))
    }

    /// The step of a multi-pod generation's id; `None` for a single pod's.
    pub fn step(&self) -> Option<u64> {
        let digits = self.0.strip_prefix(STEP_PREFIX)?;
        (digits.len() == STEP_DIGITS && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }

    /// Checks the shape of an id (from a flag or a key).
    pub fn parse(value: &str) -> Result<Generation, String> {
        let candidate = Generation(value.to_owned());
        if candidate.step().is_some() {
            return Ok(candidate);
        }
        let bytes = value.as_bytes();
        let ok = bytes.len() == ID_LEN
            && bytes.iter().enumerate().all(|(i, &b)| match i {
                8 => b == b'T',
                18 => b == b'Z',
                19 => b == b'-',
                i if i < TIME_LEN => b.is_ascii_digit(),
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            });
        if ok {
            Ok(Generation(value.to_owned()))
        } else {
            Err(format!(
                "`{value}` is not a generation id (like 20261124T021116123Z-3fa9c1d2, or \
                 step-000000001055 for a multi-pod job); `nerve-sidecar list` shows them"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Generation {
    fn default() -> Self {
        Generation::new()
    }
}

impl FromStr for Generation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Generation::parse(s)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_width_and_sort_in_time_order() {
        let early = Generation::at(
            time::macros::datetime!(2026-01-02 03:04:05.006 UTC),
            0xffff_ffff,
        );
        let late = Generation::at(time::macros::datetime!(2026-11-24 02:11:16.123 UTC), 1);
        assert_eq!(early.as_str(), "20260102T030405006Z-ffffffff");
        assert_eq!(late.as_str(), "20261124T021116123Z-00000001");
        assert!(early < late);
        assert_eq!(Generation::parse(late.as_str()), Ok(late));
    }

    #[test]
    fn refuses_malformed_ids() {
        assert!(Generation::parse("latest").is_err());
        assert!(Generation::parse("20261124T021116123Z-0000000G").is_err());
        assert!(Generation::parse("../20261124T021116123Z-000000").is_err());
        assert!(Generation::new().as_str().len() == ID_LEN);
    }

    #[test]
    fn multi_pod_ids_are_the_step_fixed_width() {
        let id = Generation::for_step(1055).unwrap();
        assert_eq!(id.as_str(), "step-000000001055");
        assert_eq!(id.step(), Some(1055));
        assert_eq!(Generation::parse(id.as_str()), Ok(id.clone()));
        assert!(Generation::for_step(9).unwrap() < id);
        assert!(Generation::for_step(MAX_STEP + 1).is_err());
        assert!(Generation::parse("step-1055").is_err());
        assert!(Generation::parse("step-00000000105x").is_err());
        assert_eq!(
            Generation::parse("20261124T021116123Z-00000001")
                .unwrap()
                .step(),
            None
        );
    }
}
