//! [`ScheduleSpec`]: the built-in schedules as plain data, parsed from the command-line grammar or from JSON.
//!
//! Grammar: `BASE[/MODE][@LO-HI]` where
//! - `BASE` is `none`, `cat` (compute and cache at odd steps, reuse at even steps) or `reuse:S1,S2,…` (1-based
//!   steps that reuse; the others compute and cache);
//! - `MODE` is `kv` (reuse K/V as cached, the default) or `recompute` (recompute K/V from the cached hidden
//!   states with the current step's modulation);
//! - `@LO-HI` restricts caching and reuse to blocks `LO..=HI` (0-based, inclusive).
//!
//! Examples: `none`, `cat`, `reuse:2,3,4`, `reuse:2,4/recompute@10-49`.
//!
//! JSON: `{"type": "reuse", "steps": [2, 4], "mode": "recompute", "layers": [10, 49]}` (`mode` and `layers` are
//! optional; `mode` is `kv` or `recompute`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Cat, LayerRange, NoPruning, PruneError, PruningSchedule, ReuseMode, ReuseSteps};

/// A built-in schedule described as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ScheduleSpec {
    /// [`NoPruning`].
    None,
    /// [`Cat`]: compute and cache at odd steps, reuse at even steps.
    Cat {
        /// How reused tokens provide K/V.
        #[serde(default)]
        mode: ReuseMode,
        /// Optional inclusive block range `[lo, hi]`.
        #[serde(default)]
        layers: Option<(usize, usize)>,
    },
    /// [`ReuseSteps`]: reuse at the listed 1-based steps, compute and cache at the others.
    Reuse {
        /// 1-based steps that reuse.
        steps: Vec<usize>,
        /// How reused tokens provide K/V.
        #[serde(default)]
        mode: ReuseMode,
        /// Optional inclusive block range `[lo, hi]`.
        #[serde(default)]
        layers: Option<(usize, usize)>,
    },
}

impl ScheduleSpec {
    /// Builds the schedule.
    pub fn build(&self) -> Result<Box<dyn PruningSchedule>, PruneError> {
        let (inner, layers): (Box<dyn PruningSchedule>, _) = match self {
            ScheduleSpec::None => return Ok(Box::new(NoPruning)),
            ScheduleSpec::Cat { mode, layers } => (Box::new(Cat::new(*mode)), *layers),
            ScheduleSpec::Reuse { steps, mode, layers } => {
                (Box::new(ReuseSteps::new(steps.iter().copied(), *mode)?), *layers)
            }
        };
        Ok(match layers {
            Some((lo, hi)) => Box::new(LayerRange::new(inner, lo, hi)?),
            None => inner,
        })
    }

    /// Whether the schedule ever reuses anything.
    pub fn prunes(&self) -> bool {
        match self {
            ScheduleSpec::None => false,
            ScheduleSpec::Cat { .. } => true,
            ScheduleSpec::Reuse { steps, .. } => !steps.is_empty(),
        }
    }
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        ScheduleSpec::Cat { mode: ReuseMode::KeyValue, layers: None }
    }
}

impl FromStr for ScheduleSpec {
    type Err = PruneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| PruneError::Spec { spec: s.to_string(), reason: reason.to_string() };
        let text = s.trim().to_ascii_lowercase();
        let (rest, layers) = match text.split_once('@') {
            Some((rest, range)) => {
                let (lo, hi) = range.split_once('-').ok_or_else(|| err("a layer range is written LO-HI"))?;
                let parse =
                    |v: &str| v.trim().parse::<usize>().map_err(|_| err("layer numbers must be integers"));
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                if lo > hi {
                    return Err(err("the layer range is empty (LO > HI)"));
                }
                (rest.to_string(), Some((lo, hi)))
            }
            None => (text.clone(), None),
        };
        let (base, mode) = match rest.split_once('/') {
            Some((base, "kv")) => (base, ReuseMode::KeyValue),
            Some((base, "recompute")) => (base, ReuseMode::RecomputeKeyValue),
            Some(_) => return Err(err("the reuse mode is `kv` or `recompute`")),
            None => (rest.as_str(), ReuseMode::KeyValue),
        };
        let spec = match base.trim() {
            "none" => {
                if layers.is_some() || rest.contains('/') {
                    return Err(err("`none` takes no mode or layer range"));
                }
                ScheduleSpec::None
            }
            "cat" => ScheduleSpec::Cat { mode, layers },
            b if b.starts_with("reuse:") => {
                let steps = b["reuse:".len()..]
                    .split(',')
                    .map(|v| v.trim().parse::<usize>().map_err(|_| err("steps are comma-separated integers")))
                    .collect::<Result<Vec<_>, _>>()?;
                if steps.contains(&0) {
                    return Err(err("steps are numbered from 1"));
                }
                if steps.contains(&1) {
                    return Err(err("step 1 cannot reuse: nothing is cached before it"));
                }
                ScheduleSpec::Reuse { steps, mode, layers }
            }
            _ => return Err(err("expected `none`, `cat` or `reuse:S1,S2,...`")),
        };
        Ok(spec)
    }
}

impl fmt::Display for ScheduleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mode, layers) = match self {
            ScheduleSpec::None => return write!(f, "none"),
            ScheduleSpec::Cat { mode, layers } => {
                write!(f, "cat")?;
                (mode, layers)
            }
            ScheduleSpec::Reuse { steps, mode, layers } => {
                let steps: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
                write!(f, "reuse:{}", steps.join(","))?;
                (mode, layers)
            }
        };
        if *mode == ReuseMode::RecomputeKeyValue {
            write!(f, "/recompute")?;
        }
        if let Some((lo, hi)) = layers {
            write!(f, "@{lo}-{hi}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grammar() {
        assert_eq!("none".parse::<ScheduleSpec>().unwrap(), ScheduleSpec::None);
        assert_eq!("cat".parse::<ScheduleSpec>().unwrap(), ScheduleSpec::default());
        assert_eq!(
            "reuse:2,3,4@10-49".parse::<ScheduleSpec>().unwrap(),
            ScheduleSpec::Reuse { steps: vec![2, 3, 4], mode: ReuseMode::KeyValue, layers: Some((10, 49)) }
        );
        assert_eq!(
            "CAT/recompute".parse::<ScheduleSpec>().unwrap(),
            ScheduleSpec::Cat { mode: ReuseMode::RecomputeKeyValue, layers: None }
        );
    }

    #[test]
    fn round_trips_through_display() {
        for s in ["none", "cat", "cat/recompute@0-29", "reuse:2,4", "reuse:2,3,4/recompute@5-9"] {
            assert_eq!(s.parse::<ScheduleSpec>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_specs() {
        for s in [
            "",
            "cats",
            "reuse:",
            "reuse:a",
            "reuse:1,2",
            "reuse:0",
            "cat@5",
            "cat@9-3",
            "cat/fast",
            "none@0-3",
        ] {
            assert!(matches!(s.parse::<ScheduleSpec>(), Err(PruneError::Spec { .. })), "{s:?} should fail");
        }
    }

    #[test]
    fn json_form() {
        let json = r#"{"type":"reuse","steps":[2,4],"mode":"recompute","layers":[0,3]}"#;
        let spec: ScheduleSpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec.to_string(), "reuse:2,4/recompute@0-3");
        assert_eq!(serde_json::to_string(&spec).unwrap(), json);
        let old = r#"{"type":"reuse","steps":[2,4],"mode":"RecomputeKeyValue","layers":[0,3]}"#;
        assert_eq!(serde_json::from_str::<ScheduleSpec>(old).unwrap(), spec);
        let cat: ScheduleSpec = serde_json::from_str(r#"{"type":"cat"}"#).unwrap();
        assert_eq!(cat, ScheduleSpec::default());
    }

    #[test]
    fn builds_schedules() {
        assert_eq!("reuse:2,4@1-2".parse::<ScheduleSpec>().unwrap().build().unwrap().name(), "reuse:2,4@1-2");
        assert!(!ScheduleSpec::None.prunes());
    }
}
