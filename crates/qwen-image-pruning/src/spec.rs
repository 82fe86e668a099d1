//! [`ScheduleSpec`]: the built-in schedules as plain data, parsed from the command-line grammar or from JSON.
//!
//! Grammar: `BASE[/MODE][@LO-HI]` where
//! - `BASE` is `none`, `cat` (compute and cache at odd steps, reuse at even steps), `reuse:S1,S2,…` (1-based
//!   steps that reuse; the others compute and cache), `region[:THRESHOLD[,MARGIN[,REFRESH]]]` (compute only the
//!   target tokens that step 1's x̂₀ moves by more than THRESHOLD, dilated by MARGIN tokens; REFRESH a 1-based step
//!   that computes everything again), `mask:FILE` (the region is the white part of a black/white image; the file
//!   name keeps its case and may contain `/`) or `adaptive[:BUDGET]` (reuse the condition images, re-cache them after
//!   a step whose velocity changed by more than BUDGET);
//! - `MODE` is `kv` (reuse K/V as cached, the default) or `recompute` (recompute K/V from the cached hidden
//!   states with the current step's modulation);
//! - `@LO-HI` restricts caching and reuse to blocks `LO..=HI` (0-based, inclusive).
//!
//! Examples: `none`, `cat`, `reuse:2,3,4`, `reuse:2,4/recompute@10-49`, `region:0.05,1`, `region:0.05,1,3/recompute`,
//! `mask:edit.png`, `adaptive:0.05`. `@LO-HI` restricts the condition images' caching and reuse; a target region
//! applies to every block of a step.
//!
//! JSON: `{"type": "reuse", "steps": [2, 4], "mode": "recompute", "layers": [10, 49]}` (`mode` and `layers` are
//! optional; `mode` is `kv` or `recompute`); `{"type": "region", "threshold": 0.05, "margin": 1, "refresh": 3}`,
//! `{"type": "mask", "path": "edit.png", "margin": 1}`, `{"type": "adaptive", "budget": 0.05}` (parameters optional,
//! defaulting to the `DEFAULT_*` constants).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    Adaptive, Cat, EditRegion, LayerRange, NoPruning, PixelMask, PruneError, PruningSchedule, RegionSource,
    ReuseMode, ReuseSteps, DEFAULT_ADAPTIVE_BUDGET, DEFAULT_MASK_MARGIN, DEFAULT_REGION_MARGIN,
    DEFAULT_REGION_THRESHOLD,
};

fn default_threshold() -> f32 {
    DEFAULT_REGION_THRESHOLD
}
fn default_region_margin() -> usize {
    DEFAULT_REGION_MARGIN
}
fn default_mask_margin() -> usize {
    DEFAULT_MASK_MARGIN
}
fn default_budget() -> f32 {
    DEFAULT_ADAPTIVE_BUDGET
}

/// A built-in schedule described as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// [`EditRegion`] from step 1's x̂₀: compute only the target tokens the edit changes.
    Region {
        /// Relative change above which a target token is edited.
        #[serde(default = "default_threshold")]
        threshold: f32,
        /// Dilation of the region, in tokens.
        #[serde(default = "default_region_margin")]
        margin: usize,
        /// Optional 1-based step (≥ 2) that computes and caches everything and derives the region again.
        #[serde(default)]
        refresh: Option<usize>,
        /// How reused tokens provide K/V.
        #[serde(default)]
        mode: ReuseMode,
        /// Optional inclusive block range `[lo, hi]` of the condition images' reuse.
        #[serde(default)]
        layers: Option<(usize, usize)>,
    },
    /// [`EditRegion`] from a black/white mask image (white = edit); the pipeline also keeps the unmasked output
    /// pixels exactly the source's.
    Mask {
        /// The mask image (PNG or JPEG).
        path: PathBuf,
        /// Dilation of the region, in tokens.
        #[serde(default = "default_mask_margin")]
        margin: usize,
        /// Optional 1-based refresh step (≥ 2).
        #[serde(default)]
        refresh: Option<usize>,
        /// How reused tokens provide K/V.
        #[serde(default)]
        mode: ReuseMode,
        /// Optional inclusive block range `[lo, hi]` of the condition images' reuse.
        #[serde(default)]
        layers: Option<(usize, usize)>,
    },
    /// [`Adaptive`]: reuse the condition images, re-cache after drift above the budget.
    Adaptive {
        /// Relative L2 change of the velocity between steps above which the next step re-caches.
        #[serde(default = "default_budget")]
        budget: f32,
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
            ScheduleSpec::Region { threshold, margin, refresh, mode, layers } => {
                let source = RegionSource::Estimate { threshold: *threshold };
                (Box::new(EditRegion::new(source, *margin, *refresh, *mode)?), *layers)
            }
            ScheduleSpec::Mask { path, margin, refresh, mode, layers } => {
                let source = RegionSource::Mask(PixelMask::load(path)?);
                (Box::new(EditRegion::new(source, *margin, *refresh, *mode)?), *layers)
            }
            ScheduleSpec::Adaptive { budget, mode, layers } => {
                (Box::new(Adaptive::new(*budget, *mode)?), *layers)
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
            ScheduleSpec::Region { .. } | ScheduleSpec::Mask { .. } | ScheduleSpec::Adaptive { .. } => true,
        }
    }

    /// The user's edit mask of a `mask:FILE` schedule (loaded), whose unmasked output pixels the pipeline keeps
    /// exactly the source's; `None` for the other schedules.
    pub fn output_mask(&self) -> Result<Option<PixelMask>, PruneError> {
        match self {
            ScheduleSpec::Mask { path, .. } => PixelMask::load(path).map(Some),
            _ => Ok(None),
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
        if s.trim().to_ascii_lowercase().starts_with("mask:") {
            return parse_mask(s.trim()).ok_or_else(|| err("a mask is written `mask:FILE[/MODE][@LO-HI]`"));
        }
        let text = s.trim().to_ascii_lowercase();
        let (rest, layers) = match text.split_once('@') {
            Some((rest, range)) => (rest, Some(parse_layer_range(range).map_err(err)?)),
            None => (text.as_str(), None),
        };
        let (base, mode) = match rest.split_once('/') {
            Some((base, "kv")) => (base, ReuseMode::KeyValue),
            Some((base, "recompute")) => (base, ReuseMode::RecomputeKeyValue),
            Some(_) => return Err(err("the reuse mode is `kv` or `recompute`")),
            None => (rest, ReuseMode::KeyValue),
        };
        match base.trim() {
            "none" if layers.is_some() || rest.contains('/') => {
                Err(err("`none` takes no mode or layer range"))
            }
            "none" => Ok(ScheduleSpec::None),
            "cat" => Ok(ScheduleSpec::Cat { mode, layers }),
            b if b.starts_with("reuse:") => {
                let steps = parse_reuse_steps(&b["reuse:".len()..]).map_err(err)?;
                Ok(ScheduleSpec::Reuse { steps, mode, layers })
            }
            b if b == "region" || b.starts_with("region:") => {
                let params = b.strip_prefix("region").unwrap_or_default().trim_start_matches(':');
                let (threshold, margin, refresh) = parse_region_params(params).map_err(err)?;
                Ok(ScheduleSpec::Region { threshold, margin, refresh, mode, layers })
            }
            b if b == "adaptive" || b.starts_with("adaptive:") => {
                let budget = match b.strip_prefix("adaptive:") {
                    Some(v) => v.trim().parse::<f32>().ok().filter(|t| t.is_finite() && *t >= 0.0),
                    None => Some(DEFAULT_ADAPTIVE_BUDGET),
                };
                let budget = budget.ok_or_else(|| err("the adaptive budget is a number ≥ 0"))?;
                Ok(ScheduleSpec::Adaptive { budget, mode, layers })
            }
            _ => Err(err(
                "expected `none`, `cat`, `reuse:S1,S2,...`, `region[:T,M,R]`, `mask:FILE` or `adaptive[:B]`",
            )),
        }
    }
}

/// `LO-HI`, an inclusive block range; the error is the reason.
fn parse_layer_range(range: &str) -> Result<(usize, usize), &'static str> {
    let (lo, hi) = range.split_once('-').ok_or("a layer range is written LO-HI")?;
    let parse = |v: &str| v.trim().parse::<usize>().map_err(|_| "layer numbers must be integers");
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo > hi {
        return Err("the layer range is empty (LO > HI)");
    }
    Ok((lo, hi))
}

/// `S1,S2,...` of `reuse:`: 1-based steps, step 1 excluded; the error is the reason.
fn parse_reuse_steps(list: &str) -> Result<Vec<usize>, &'static str> {
    let steps = list
        .split(',')
        .map(|v| v.trim().parse::<usize>().map_err(|_| "steps are comma-separated integers"))
        .collect::<Result<Vec<_>, _>>()?;
    if steps.contains(&0) {
        return Err("steps are numbered from 1");
    }
    if steps.contains(&1) {
        return Err("step 1 cannot reuse: nothing is cached before it");
    }
    Ok(steps)
}

/// `[THRESHOLD[,MARGIN[,REFRESH]]]` of `region:` (defaults for the missing ones); the error is the reason.
fn parse_region_params(params: &str) -> Result<(f32, usize, Option<usize>), &'static str> {
    let values: Vec<&str> = params.split(',').map(str::trim).filter(|v| !v.is_empty()).collect();
    if values.len() > 3 {
        return Err("`region` takes at most THRESHOLD,MARGIN,REFRESH");
    }
    let threshold = match values.first() {
        Some(v) => v.parse::<f32>().ok().filter(|t| t.is_finite() && *t >= 0.0),
        None => Some(DEFAULT_REGION_THRESHOLD),
    };
    let threshold = threshold.ok_or("the region threshold is a number ≥ 0")?;
    let int = |i: usize, what: &'static str| values.get(i).map(|v| v.parse::<usize>().map_err(|_| what));
    let margin =
        int(1, "the region margin is a whole number of tokens").transpose()?.unwrap_or(DEFAULT_REGION_MARGIN);
    let refresh = int(2, "the refresh step is a step number").transpose()?;
    if refresh.is_some_and(|r| r < 2) {
        return Err("the refresh step is ≥ 2 (step 1 always computes everything)");
    }
    Ok((threshold, margin, refresh))
}

/// `mask:FILE[/MODE][@LO-HI]`, the file name as given (its case and any `/` kept): a trailing `@LO-HI` and a
/// trailing `/kv` or `/recompute` are the suffixes, the rest is the file.
fn parse_mask(s: &str) -> Option<ScheduleSpec> {
    let mut rest = &s["mask:".len()..];
    let mut layers = None;
    if let Some((head, range)) = rest.rsplit_once('@') {
        let (lo, hi) = range.split_once('-')?;
        let (lo, hi) = (lo.trim().parse::<usize>().ok()?, hi.trim().parse::<usize>().ok()?);
        if lo > hi {
            return None;
        }
        (rest, layers) = (head, Some((lo, hi)));
    }
    let mut mode = ReuseMode::KeyValue;
    for (suffix, m) in [("/kv", ReuseMode::KeyValue), ("/recompute", ReuseMode::RecomputeKeyValue)] {
        if rest.to_ascii_lowercase().ends_with(suffix) {
            (rest, mode) = (&rest[..rest.len() - suffix.len()], m);
        }
    }
    let path = rest.trim();
    (!path.is_empty()).then(|| ScheduleSpec::Mask {
        path: PathBuf::from(path),
        margin: DEFAULT_MASK_MARGIN,
        refresh: None,
        mode,
        layers,
    })
}

impl fmt::Display for ScheduleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mode, layers) = match self {
            ScheduleSpec::None => return write!(f, "none"),
            ScheduleSpec::Region { threshold, margin, refresh, mode, layers } => {
                write!(f, "region:{threshold},{margin}")?;
                if let Some(r) = refresh {
                    write!(f, ",{r}")?;
                }
                (mode, layers)
            }
            ScheduleSpec::Mask { path, mode, layers, .. } => {
                write!(f, "mask:{}", path.display())?;
                (mode, layers)
            }
            ScheduleSpec::Adaptive { budget, mode, layers } => {
                write!(f, "adaptive:{budget}")?;
                (mode, layers)
            }
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
        for s in [
            "none",
            "cat",
            "cat/recompute@0-29",
            "reuse:2,4",
            "reuse:2,3,4/recompute@5-9",
            "region:0.05,1",
            "region:0.2,0,3/recompute@2-5",
            "adaptive:0.05",
            "mask:Dir/Edit.png/recompute@0-3",
        ] {
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
            "region:x",
            "region:0.1,1,1",
            "region:-1",
            "region:0.1,1,3,4",
            "adaptive:nan",
            "mask:",
            "mask:a.png@3-1",
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
    fn region_specs_have_defaults() {
        let spec = |s: &str| s.parse::<ScheduleSpec>().unwrap();
        let region = ScheduleSpec::Region {
            threshold: DEFAULT_REGION_THRESHOLD,
            margin: DEFAULT_REGION_MARGIN,
            refresh: None,
            mode: ReuseMode::KeyValue,
            layers: None,
        };
        assert_eq!(spec("region"), region);
        assert_eq!(serde_json::from_str::<ScheduleSpec>(r#"{"type":"region"}"#).unwrap(), region);
        assert_eq!(
            spec("adaptive"),
            ScheduleSpec::Adaptive {
                budget: DEFAULT_ADAPTIVE_BUDGET,
                mode: ReuseMode::KeyValue,
                layers: None
            }
        );
        let mask: ScheduleSpec =
            serde_json::from_str(r#"{"type":"mask","path":"m.png","margin":2}"#).unwrap();
        assert!(matches!(mask, ScheduleSpec::Mask { margin: 2, .. }));
        let err = mask.build().unwrap_err().to_string();
        assert!(err.contains("cannot read the mask"), "{err}");
        assert_eq!(spec("region:0.1,2,3@1-2").build().unwrap().name(), "region:0.1,2,3@1-2");
    }

    #[test]
    fn builds_schedules() {
        assert_eq!("reuse:2,4@1-2".parse::<ScheduleSpec>().unwrap().build().unwrap().name(), "reuse:2,4@1-2");
        assert!(!ScheduleSpec::None.prunes());
    }
}
