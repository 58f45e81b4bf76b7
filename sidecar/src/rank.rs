//! Which rank of a multi-pod job this pod is, and how many pods the job has.
//!
//! `--rank` / `--world-size` (`NERVE_RANK`, `NERVE_WORLD_SIZE`) when given; otherwise read from
//! what the pod already has, in this order:
//! 1. torchrun and the Kubeflow training operator: `PET_NODE_RANK` with `PET_NNODES` (an elastic
//!    `MIN:MAX` range is refused: the world size must be one number);
//! 2. torchrun's worker environment: `GROUP_RANK` with `GROUP_WORLD_SIZE`;
//! 3. an Indexed Job: `JOB_COMPLETION_INDEX`, with the world size given (the injector sets
//!    `NERVE_WORLD_SIZE` from the Job's `completions`).
//!
//! None of them: a single pod, world size 1, today's layout.

use nerve_store::part::Rank;

/// Where the rank and the world size were found, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankSource {
    Flags,
    Torchrun,
    TorchrunGroup,
    IndexedJob,
    SinglePod,
}

impl RankSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RankSource::Flags => "--rank/--world-size (NERVE_RANK, NERVE_WORLD_SIZE)",
            RankSource::Torchrun => "PET_NODE_RANK/PET_NNODES",
            RankSource::TorchrunGroup => "GROUP_RANK/GROUP_WORLD_SIZE",
            RankSource::IndexedJob => "JOB_COMPLETION_INDEX",
            RankSource::SinglePod => "no rank given: a single pod",
        }
    }
}

/// This pod's rank, from the flags or the environment `env` (a lookup, so tests need no
/// process environment).
pub fn detect_rank(
    rank: Option<u32>,
    world_size: Option<u32>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Rank, RankSource), String> {
    let number = |name: &str| -> Result<Option<u32>, String> {
        match env(name) {
            None => Ok(None),
            Some(value) => value.trim().parse().map(Some).map_err(|_| {
                format!("{name}=`{value}` is not a rank or a pod count; set NERVE_RANK and NERVE_WORLD_SIZE")
            }),
        }
    };
    let nnodes = match env("PET_NNODES") {
        None => None,
        Some(value) => Some(parse_nnodes(&value)?),
    };
    let found = [
        (RankSource::Torchrun, number("PET_NODE_RANK")?, nnodes),
        (
            RankSource::TorchrunGroup,
            number("GROUP_RANK")?,
            number("GROUP_WORLD_SIZE")?,
        ),
        (
            RankSource::IndexedJob,
            number("JOB_COMPLETION_INDEX")?,
            None,
        ),
    ];
    let launcher = found.iter().find(|(_, r, w)| r.is_some() || w.is_some());
    let source = if rank.is_some() || world_size.is_some() {
        RankSource::Flags
    } else {
        launcher.map_or(RankSource::SinglePod, |(source, _, _)| *source)
    };
    let rank = rank.or_else(|| launcher.and_then(|(_, r, _)| *r));
    let world = world_size.or_else(|| launcher.and_then(|(_, _, w)| *w));
    match (rank, world) {
        (None, None) => Ok((
            Rank {
                rank: 0,
                world_size: 1,
            },
            RankSource::SinglePod,
        )),
        (Some(rank), Some(world)) => Rank::new(rank, world)
            .map(|r| (r, source))
            .map_err(|e| format!("{e} (from {})", source.as_str())),
        (None, Some(world)) => Err(format!(
            "the world size is {world} (from {}) but this pod's rank is unknown; set --rank \
             (NERVE_RANK)",
            source.as_str()
        )),
        (Some(_), None) if source == RankSource::IndexedJob => {
            // An Indexed Job that is not a multi-pod training job: one pod of many, each on
            // its own; nothing to share a generation with.
            Ok((
                Rank {
                    rank: 0,
                    world_size: 1,
                },
                RankSource::SinglePod,
            ))
        }
        (Some(rank), None) => Err(format!(
            "this pod is rank {rank} (from {}) but the job's pod count is unknown; set \
             --world-size (NERVE_WORLD_SIZE)",
            source.as_str()
        )),
    }
}

/// `PET_NNODES`: `N`, or torchrun's `MIN:MAX`, which must then be one number.
fn parse_nnodes(value: &str) -> Result<u32, String> {
    let parse = |v: &str| v.trim().parse::<u32>().ok();
    let parsed = match value.split_once(':') {
        Some((min, max)) => parse(min).filter(|&min| Some(min) == parse(max)),
        None => parse(value),
    };
    parsed.ok_or_else(|| {
        format!(
            "PET_NNODES=`{value}` is not one pod count (an elastic range cannot name a \
             generation every rank shares); set NERVE_WORLD_SIZE"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn detect(
        flags: (Option<u32>, Option<u32>),
        pairs: &[(&str, &str)],
    ) -> Result<(u32, u32, RankSource), String> {
        detect_rank(flags.0, flags.1, &env(pairs)).map(|(r, s)| (r.rank, r.world_size, s))
    }

    #[test]
    fn nothing_set_is_a_single_pod() {
        assert_eq!(detect((None, None), &[]), Ok((0, 1, RankSource::SinglePod)));
    }

    #[test]
    fn flags_win_over_every_launcher_variable() {
        let launcher = [("PET_NODE_RANK", "1"), ("PET_NNODES", "4")];
        assert_eq!(
            detect((Some(2), Some(3)), &launcher),
            Ok((2, 3, RankSource::Flags))
        );
        // The injector's world size with an Indexed Job's index.
        assert_eq!(
            detect((None, Some(3)), &[("JOB_COMPLETION_INDEX", "2")]),
            Ok((2, 3, RankSource::Flags))
        );
    }

    #[test]
    fn torchrun_and_the_training_operator_name_the_node_rank() {
        assert_eq!(
            detect((None, None), &[("PET_NODE_RANK", "1"), ("PET_NNODES", "2")]),
            Ok((1, 2, RankSource::Torchrun))
        );
        assert_eq!(
            detect(
                (None, None),
                &[("PET_NODE_RANK", "0"), ("PET_NNODES", "3:3")]
            ),
            Ok((0, 3, RankSource::Torchrun))
        );
        let elastic = detect(
            (None, None),
            &[("PET_NODE_RANK", "0"), ("PET_NNODES", "1:4")],
        );
        assert!(elastic.unwrap_err().contains("NERVE_WORLD_SIZE"));
        assert_eq!(
            detect(
                (None, None),
                &[("GROUP_RANK", "3"), ("GROUP_WORLD_SIZE", "4")]
            ),
            Ok((3, 4, RankSource::TorchrunGroup))
        );
        // torchrun's variables come before the worker group's.
        assert_eq!(
            detect(
                (None, None),
                &[
                    ("PET_NODE_RANK", "1"),
                    ("PET_NNODES", "2"),
                    ("GROUP_RANK", "0"),
                    ("GROUP_WORLD_SIZE", "9")
                ]
            ),
            Ok((1, 2, RankSource::Torchrun))
        );
    }

    #[test]
    fn an_indexed_job_needs_its_world_size_to_be_multi_pod() {
        assert_eq!(
            detect((None, None), &[("JOB_COMPLETION_INDEX", "4")]),
            Ok((0, 1, RankSource::SinglePod))
        );
    }

    #[test]
    fn inconsistent_or_broken_settings_name_the_fix() {
        assert!(detect((None, Some(3)), &[]).unwrap_err().contains("--rank"));
        assert!(
            detect((Some(1), None), &[])
                .unwrap_err()
                .contains("--world-size")
        );
        assert!(
            detect((Some(3), Some(3)), &[])
                .unwrap_err()
                .contains("not below")
        );
        assert!(
            detect((None, None), &[("PET_NODE_RANK", "x"), ("PET_NNODES", "2")])
                .unwrap_err()
                .contains("PET_NODE_RANK")
        );
    }
}
