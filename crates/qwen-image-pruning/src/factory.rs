//! [`ScheduleFactory`]: how a caller hands a schedule to something that runs it more than once.
//!
//! A pipeline builds a fresh schedule for each use (one to check it with [`dry_run`](crate::dry_run) before anything
//! runs, one per CFG layout, one for the run itself), so that a stateful schedule always starts from its initial
//! state. Three things are factories:
//!
//! - a [`ScheduleSpec`] (the built-in schedules as data: `"cat".parse::<ScheduleSpec>()?`);
//! - any schedule that is `Clone` (each build is a clone of the value given: `&MySchedule::new()`);
//! - a closure wrapped by [`from_fn`], returning any [`PruningSchedule`] (a `Box<dyn PruningSchedule>` too), for
//!   schedules that are not `Clone` or that must be built differently each time.
//!
//! ```
//! use qwen_image_pruning::{from_fn, Cat, ScheduleFactory, ScheduleSpec};
//!
//! # fn main() -> Result<(), qwen_image_pruning::PruneError> {
//! let spec: ScheduleSpec = "reuse:2,3".parse()?;
//! let factories: [&dyn ScheduleFactory; 3] = [&spec, &Cat::default(), &from_fn(Cat::default)];
//! assert_eq!(factories.map(|f| f.build().unwrap().name()), ["reuse:2,3", "cat", "cat"]);
//! # Ok(()) }
//! ```

use crate::{PixelMask, PruneError, PruningSchedule, ScheduleSpec};

/// Builds a fresh pruning schedule, in its initial state, each time it is asked.
pub trait ScheduleFactory {
    /// A new schedule in its initial state.
    fn build(&self) -> Result<Box<dyn PruningSchedule>, PruneError>;

    /// The user's edit mask, when the schedule edits a masked region whose unmasked output pixels the pipeline must
    /// keep exactly the source's (`mask:FILE`). The default is `None`.
    fn output_mask(&self) -> Result<Option<PixelMask>, PruneError> {
        Ok(None)
    }
}

impl ScheduleFactory for ScheduleSpec {
    fn build(&self) -> Result<Box<dyn PruningSchedule>, PruneError> {
        ScheduleSpec::build(self)
    }

    fn output_mask(&self) -> Result<Option<PixelMask>, PruneError> {
        ScheduleSpec::output_mask(self)
    }
}

/// A `Clone` schedule is its own factory: each build is a clone of it (so it must be given in its initial state).
impl<S: PruningSchedule + Clone + 'static> ScheduleFactory for S {
    fn build(&self) -> Result<Box<dyn PruningSchedule>, PruneError> {
        Ok(Box::new(self.clone()))
    }
}

/// A factory calling a closure; made by [`from_fn`].
#[derive(Clone, Copy, Debug)]
pub struct FromFn<F>(F);

/// A factory that calls `f` for every schedule it builds: `from_fn(|| MySchedule::new(0.5))`. The closure may return
/// any [`PruningSchedule`], a `Box<dyn PruningSchedule>` included.
pub fn from_fn<S, F>(f: F) -> FromFn<F>
where
    S: PruningSchedule + 'static,
    F: Fn() -> S,
{
    FromFn(f)
}

impl<S, F> ScheduleFactory for FromFn<F>
where
    S: PruningSchedule + 'static,
    F: Fn() -> S,
{
    fn build(&self) -> Result<Box<dyn PruningSchedule>, PruneError> {
        Ok(Box::new((self.0)()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerRange, NoPruning, ReuseMode, ReuseSteps};

    #[test]
    fn specs_clone_schedules_and_closures_are_factories() {
        let reuse = ReuseSteps::new([2, 4], ReuseMode::KeyValue).unwrap();
        let ranged = LayerRange::new(NoPruning, 0, 1).unwrap();
        let boxed = from_fn(|| -> Box<dyn PruningSchedule> { Box::new(NoPruning) });
        let factories: Vec<&dyn ScheduleFactory> = vec![&reuse, &ranged, &boxed, &ScheduleSpec::None];
        let names: Vec<String> = factories.iter().map(|f| f.build().unwrap().name()).collect();
        assert_eq!(names, ["reuse:2,4", "none@0-1", "none", "none"]);
    }
}
