//! The source of a [`WeightStore`](super::WeightStore) without files: every tensor a loader asks for is made up on
//! the spot with the asked shape, and the request is recorded.
//!
//! - [`Fill::Random`]: random values (see [`synthetic::init_for`] for the scales), created on the device for device
//!   tensors (never on the host), so that a model of any size can be built from its config alone.
//! - [`Fill::Empty`]: tensors with no elements (the leading dimension is 0) and no memory: running a loader this
//!   way lists the checkpoint it expects (keys and shapes) from the same code that loads.

use std::collections::HashMap;

use burn::tensor::{backend::Backend, DType, Distribution, Tensor, TensorData};

use crate::synthetic::{self, Init};

/// What a generated store puts into the tensors it creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fill {
    /// Random values; the same seed gives the same weights whatever the loading order.
    Random {
        /// The store seed, mixed with each key.
        seed: u64,
    },
    /// Nothing: tensors of the asked rank whose leading dimension is 0.
    Empty,
}

/// The tensors created so far and how they are filled.
#[derive(Debug)]
pub(super) struct Generated {
    pub fill: Fill,
    /// Key and asked shape of every created tensor, in request order.
    created: Vec<(String, Vec<usize>)>,
    index: HashMap<String, usize>,
    /// Bytes the created tensors take at their asked shapes.
    bytes: usize,
}

impl Generated {
    pub fn new(fill: Fill) -> Self {
        Generated { fill, created: Vec::new(), index: HashMap::new(), bytes: 0 }
    }

    /// Key and asked shape of every created tensor, in request order.
    pub fn created(&self) -> &[(String, Vec<usize>)] {
        &self.created
    }

    /// The asked shape of `key`, if it was created.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.index.get(key).map(|&i| self.created[i].1.as_slice())
    }

    /// Bytes the created tensors take at their asked shapes in `dtype`s of the store.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records a request (once per key).
    pub fn record(&mut self, key: &str, shape: &[usize], dtype: DType) {
        if self.index.contains_key(key) {
            return;
        }
        self.index.insert(key.to_string(), self.created.len());
        self.created.push((key.to_string(), shape.to_vec()));
        self.bytes += dtype.size() * shape.iter().product::<usize>();
    }

    /// A device tensor for `key` of the asked `shape`.
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        dtype: DType,
        device: &B::Device,
    ) -> Tensor<B, D> {
        self.record(key, &shape, dtype);
        make(self.fill, key, shape, dtype, device)
    }

    /// Host data for `key` of the asked `shape` (random values from [`synthetic::fill_f32`]).
    pub fn data(&mut self, key: &str, shape: &[usize], dtype: DType) -> TensorData {
        self.record(key, shape, dtype);
        let mut made = shape.to_vec();
        let mut values = Vec::new();
        match self.fill {
            Fill::Empty => {
                if let Some(first) = made.first_mut() {
                    *first = 0;
                }
            }
            Fill::Random { seed } => {
                values = vec![1f32; shape.iter().product()];
                if let Init::Random { std } = synthetic::init_for(key, shape) {
                    synthetic::fill_f32(synthetic::key_seed(seed, key), std, &mut values);
                }
            }
        }
        TensorData::new(values, made).convert_dtype(dtype)
    }
}

/// The device tensor a generated store with `fill` makes for `key` at the asked `shape`: the same values every time
/// (so a tensor left off the device at load can be made again, see [`DeferredTensor`](super::DeferredTensor)).
pub(super) fn make<B: Backend, const D: usize>(
    fill: Fill,
    key: &str,
    mut shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    let Fill::Random { seed } = fill else {
        if let Some(first) = shape.first_mut() {
            *first = 0;
        }
        return Tensor::empty(shape, (device, dtype));
    };
    match synthetic::init_for(key, &shape) {
        Init::Ones => Tensor::ones(shape, (device, dtype)),
        Init::Random { std } => {
            // The backend's generator is process-wide: seeding and drawing must not interleave with another
            // thread's, or the same seed would not give the same weights.
            static SEEDED_DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _guard = SEEDED_DRAW.lock().unwrap_or_else(|e| e.into_inner());
            B::seed(device, synthetic::key_seed(seed, key));
            Tensor::random(shape, Distribution::Normal(0.0, std), (device, dtype))
        }
    }
}
