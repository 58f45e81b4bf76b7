//! A MAX all-reduce among test trainers, through files in a directory they share: what
//! `torch.distributed.all_reduce(flag, op=MAX)` is to a real multi-node job, and what the test
//! provides in its place (issue: the trainers agree, the sidecars follow the marker).
//!
//! At each step boundary every rank writes its value to `<dir>/s<step>/r<rank>`, waits until all
//! `world_size` ranks wrote theirs, and takes the largest. Like a real collective it waits as
//! long as a rank is missing (a hung rank hangs the job), so every rank leaves a step with the
//! same answer. Rank 0 removes the files of step `s-2` after step `s`: by then every rank has
//! read them.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Between looks for the other ranks' values: a small fraction of a test step (10 ms).
const POLL: Duration = Duration::from_millis(2);

/// One rank's end of the all-reduce.
#[derive(Debug, Clone)]
pub struct FileAllReduce {
    dir: PathBuf,
    rank: u32,
    world_size: u32,
}

impl FileAllReduce {
    pub fn new(dir: &Path, rank: u32, world_size: u32) -> std::io::Result<FileAllReduce> {
        std::fs::create_dir_all(dir)?;
        Ok(FileAllReduce {
            dir: dir.to_path_buf(),
            rank,
            world_size,
        })
    }

    /// The largest `value` any rank gives for `step` (blocking until every rank gave one).
    pub fn max(&self, step: u64, value: u64) -> std::io::Result<u64> {
        let step_dir = self.dir.join(format!("s{step}"));
        std::fs::create_dir_all(&step_dir)?;
        let mine = step_dir.join(format!("r{}", self.rank));
        let tmp = step_dir.join(format!(".r{}.tmp", self.rank));
        std::fs::write(&tmp, value.to_string())?;
        std::fs::rename(&tmp, &mine)?;
        let answer = loop {
            let values: Vec<u64> = (0..self.world_size)
                .filter_map(|rank| {
                    std::fs::read_to_string(step_dir.join(format!("r{rank}")))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                })
                .collect();
            if values.len() == self.world_size as usize {
                break values.into_iter().max().unwrap_or(value);
            }
            std::thread::sleep(POLL);
        };
        if self.rank == 0 && step >= 2 {
            let _ = std::fs::remove_dir_all(self.dir.join(format!("s{}", step - 2)));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_largest_value_of_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..3u32)
            .map(|rank| {
                let reduce = FileAllReduce::new(dir.path(), rank, 3).unwrap();
                std::thread::spawn(move || {
                    (0..5u64)
                        .map(|step| {
                            let flag = u64::from(rank == 1 && step == 3);
                            reduce.max(step, flag).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), [0, 0, 0, 1, 0]);
        }
    }
}
