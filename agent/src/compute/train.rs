//! Training: a stack of conv2d layers (ReLU between them) fitted by SGD with momentum to an
//! MSE loss, one step at a time, with the batch split into micro-batches on several streams.
//!
//! Layers are trainable or frozen. A frozen layer (a KernelDeployment's kernel) keeps its
//! weights, and its forward pass goes through a [`KernelLayerRunner`], the seam where a
//! rollout decides which revision of the kernel computes each operation.

use std::sync::Arc;

use faer::Par;
use futures::future::{BoxFuture, try_join_all};
use kernelflow_crds::Conv2dSpec;

use super::ComputeError;
use super::backend::{Backend, Download, Event, Op, take_download};
use super::conv::Conv2dParams;
use super::engine::{Engine, run_sync};
use super::ops::{sgd, uniform};

/// One layer's parameters and optimiser state.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    /// Parameters for a batch of one sample.
    pub params: Conv2dParams,
    pub weight: Vec<f32>,
    /// Zeros, never updated, when the conv2d has no bias.
    pub bias: Vec<f32>,
    /// Whether the conv2d has a bias.
    pub has_bias: bool,
    /// Frozen layers are not updated and run their forward pass through a [`KernelLayerRunner`].
    pub frozen: bool,
    weight_velocity: Vec<f32>,
    bias_velocity: Vec<f32>,
}

/// A model: layers whose shapes chain from `input` (channels, height, width).
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub input: [usize; 3],
    pub layers: Vec<Layer>,
}

impl Model {
    /// Layers initialised uniformly in `±1/sqrt(fan_in)` from `seed`, as PyTorch's default.
    pub fn new(specs: &[Conv2dSpec], input: [u32; 3], seed: u64) -> Result<Self, ComputeError> {
        let mut shape = input;
        let mut layers = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if spec.in_channels != shape[0] {
                return Err(ComputeError::Shape(format!(
                    "layer {i} takes {} channels but gets {}",
                    spec.in_channels, shape[0]
                )));
            }
            let params = Conv2dParams::from_spec(spec, 1, [shape[1], shape[2]])?;
            let fan_in =
                (params.in_channels / params.groups * params.kernel[0] * params.kernel[1]) as f32;
            let scale = 1.0 / fan_in.sqrt();
            let layer_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64 * 2);
            let [oh, ow] = params.output();
            shape = [spec.out_channels, oh as u32, ow as u32];
            layers.push(Layer {
                weight: uniform(params.weight_len(), layer_seed, scale),
                bias: if spec.bias {
                    uniform(params.out_channels, layer_seed.wrapping_add(1), scale)
                } else {
                    vec![0.0; params.out_channels]
                },
                has_bias: spec.bias,
                frozen: false,
                weight_velocity: vec![0.0; params.weight_len()],
                bias_velocity: vec![0.0; params.out_channels],
                params,
            });
        }
        if layers.is_empty() {
            return Err(ComputeError::Shape(
                "a model needs at least one layer".into(),
            ));
        }
        Ok(Self {
            input: input.map(|v| v as usize),
            layers,
        })
    }

    /// Elements of one input sample and of one output sample.
    pub fn sample_sizes(&self) -> (usize, usize) {
        let last = &self.layers[self.layers.len() - 1].params;
        (self.input.iter().product(), last.output_len())
    }

    /// Freezes layer `index` with given weights (a kernel's): it keeps them from now on.
    pub fn freeze(
        &mut self,
        index: usize,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<(), ComputeError> {
        let layer = self
            .layers
            .get_mut(index)
            .ok_or_else(|| ComputeError::Shape(format!("no layer {index}")))?;
        let bias_len = bias.map_or(layer.bias.len(), <[f32]>::len);
        if weight.len() != layer.weight.len() || bias_len != layer.bias.len() {
            return Err(ComputeError::Shape(format!(
                "layer {index} needs {} weights and {} biases, got {} and {bias_len}",
                layer.weight.len(),
                layer.bias.len(),
                weight.len()
            )));
        }
        layer.weight = weight.to_vec();
        layer.bias = bias.map_or_else(|| vec![0.0; layer.bias.len()], <[f32]>::to_vec);
        layer.has_bias = bias.is_some();
        layer.frozen = true;
        Ok(())
    }

    /// Applies averaged gradients: one SGD-with-momentum step on the trainable layers.
    /// `grads` has one entry per layer; frozen layers' entries are ignored.
    pub fn apply(&mut self, grads: &[(Vec<f32>, Vec<f32>)], learning_rate: f32, momentum: f32) {
        for (layer, (dw, db)) in self.layers.iter_mut().zip(grads) {
            if layer.frozen {
                continue;
            }
            sgd(
                &mut layer.weight,
                dw,
                &mut layer.weight_velocity,
                learning_rate,
                momentum,
            );
            if layer.has_bias {
                sgd(
                    &mut layer.bias,
                    db,
                    &mut layer.bias_velocity,
                    learning_rate,
                    momentum,
                );
            }
        }
    }

    /// Every tensor of the model and its optimiser state, by name (`layers.<i>.weight`,
    /// `.bias`, `.weight_velocity`, `.bias_velocity`): what a checkpoint holds.
    pub fn state_dict(&self) -> Vec<(String, &[f32])> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                [
                    ("weight", &l.weight),
                    ("bias", &l.bias),
                    ("weight_velocity", &l.weight_velocity),
                    ("bias_velocity", &l.bias_velocity),
                ]
                .map(|(name, v)| (format!("layers.{i}.{name}"), v.as_slice()))
            })
            .collect()
    }

    /// Restores what [`Model::state_dict`] returned, tensor by tensor from `get`; every
    /// tensor must be present with its length. Frozen layers keep their weights.
    pub fn load_state_dict(
        &mut self,
        mut get: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<(), ComputeError> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let frozen = l.frozen;
            for (name, v) in [
                ("weight", &mut l.weight),
                ("bias", &mut l.bias),
                ("weight_velocity", &mut l.weight_velocity),
                ("bias_velocity", &mut l.bias_velocity),
            ] {
                let key = format!("layers.{i}.{name}");
                let value = get(&key)
                    .filter(|t| t.len() == v.len())
                    .ok_or_else(|| ComputeError::Shape(format!("{key}: missing or resized")))?;
                if !frozen {
                    *v = value;
                }
            }
        }
        Ok(())
    }
}

/// Runs the forward pass of frozen layers: the seam between training and a kernel's rollout.
///
/// Training calls it once per frozen layer and micro-batch with the layer's index in the
/// model, its parameters for that micro-batch and the input activations; it returns the
/// conv2d output (before ReLU). The backward pass through a frozen layer uses the layer's
/// own weights ([`Layer::weight`]), so a runner that computes with other weights (a canary
/// revision) makes the gradients below it approximate.
pub trait KernelLayerRunner: Send + Sync {
    fn forward<'a>(
        &'a self,
        index: usize,
        layer: &'a Layer,
        params: Conv2dParams,
        x: Arc<Vec<f32>>,
    ) -> BoxFuture<'a, Result<Vec<f32>, ComputeError>>;
}

/// The default runner: the layer's own weights on the synchronous path, off the async runtime.
pub struct SyncPath;

impl KernelLayerRunner for SyncPath {
    fn forward<'a>(
        &'a self,
        _index: usize,
        layer: &'a Layer,
        params: Conv2dParams,
        x: Arc<Vec<f32>>,
    ) -> BoxFuture<'a, Result<Vec<f32>, ComputeError>> {
        let inputs = vec![
            x,
            Arc::new(layer.weight.clone()),
            Arc::new(layer.bias.clone()),
        ];
        Box::pin(async move {
            tokio::task::spawn_blocking(move || run_sync(Op::Conv2d(params), &inputs))
                .await
                .map_err(|e| ComputeError::Stopped(e.to_string()))?
                .map(|mut out| out.swap_remove(0))
        })
    }
}

/// Mean loss and mean gradients (per layer: weight, bias) of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    pub loss: f32,
    pub grads: Vec<(Vec<f32>, Vec<f32>)>,
}

/// A batch split into micro-batches, each uploaded onto its own stream.
pub struct Staged<B: Backend> {
    batch: usize,
    parts: Vec<StagedPart<B>>,
}

struct StagedPart<B: Backend> {
    stream: usize,
    size: usize,
    x: B::Buffer,
    target: B::Buffer,
}

/// Splits `batch` samples of `x` and `target` into `micro_batches` parts and enqueues each
/// part's upload on its own stream. `sample_sizes` are the model's ([`Model::sample_sizes`]).
pub fn upload<B: Backend>(
    backend: &B,
    (in_size, out_size): (usize, usize),
    x: &[f32],
    target: &[f32],
    batch: usize,
    micro_batches: usize,
) -> Result<Staged<B>, ComputeError> {
    if x.len() != batch * in_size || target.len() != batch * out_size || batch == 0 {
        return Err(ComputeError::Shape(format!(
            "a batch of {batch} needs {} inputs and {} targets",
            batch * in_size,
            batch * out_size
        )));
    }
    let parts = micro_batches.clamp(1, batch);
    let mut start = 0;
    let parts = (0..parts)
        .map(|part| {
            let size = batch / parts + usize::from(part < batch % parts);
            let stream = part % backend.streams();
            let xs = Arc::new(x[start * in_size..(start + size) * in_size].to_vec());
            let ts = Arc::new(target[start * out_size..(start + size) * out_size].to_vec());
            start += size;
            StagedPart {
                stream,
                size,
                x: backend.upload(stream, xs),
                target: backend.upload(stream, ts),
            }
        })
        .collect();
    Ok(Staged { batch, parts })
}

/// Forward and backward passes over `batch` samples of `x` against `target`, split into
/// `micro_batches` parts on different streams. Each part's mean loss and gradients are
/// weighted by its share of the batch, so the result is the whole batch's mean.
pub async fn gradients<B: Backend>(
    engine: &Engine<B>,
    model: &Model,
    x: &[f32],
    target: &[f32],
    batch: usize,
    micro_batches: usize,
) -> Result<StepResult, ComputeError> {
    let backend = engine.backend().as_ref();
    let staged = upload(
        backend,
        model.sample_sizes(),
        x,
        target,
        batch,
        micro_batches,
    )?;
    staged_gradients(backend, model, staged, &SyncPath).await
}

/// [`gradients`] of a batch already uploaded, with frozen layers' forward passes through
/// `kernels`. The parts run at once; their results are summed in part order, so the result
/// does not depend on which part finishes first.
pub async fn staged_gradients<B: Backend>(
    backend: &B,
    model: &Model,
    staged: Staged<B>,
    kernels: &dyn KernelLayerRunner,
) -> Result<StepResult, ComputeError> {
    let batch = staged.batch;
    let results = try_join_all(
        staged
            .parts
            .into_iter()
            .map(|p| part_gradients(backend, model, p, kernels)),
    )
    .await?;
    let mut loss = 0.0;
    let mut grads: Vec<(Vec<f32>, Vec<f32>)> = model
        .layers
        .iter()
        .map(|l| (vec![0.0; l.weight.len()], vec![0.0; l.bias.len()]))
        .collect();
    for (size, values) in results {
        let share = size as f32 / batch as f32;
        let mut values = values.into_iter();
        loss += share * values.next().expect("the loss")[0];
        for (layer, (dw, db)) in model.layers.iter().zip(grads.iter_mut()) {
            if layer.frozen {
                continue;
            }
            for acc in [dw, db] {
                acc.iter_mut()
                    .zip(values.next().expect("a gradient"))
                    .for_each(|(a, g)| *a += share * g);
            }
        }
    }
    Ok(StepResult { loss, grads })
}

/// A download's data once its event has fired.
async fn landed((event, sink): (Event, Download)) -> Result<Vec<f32>, ComputeError> {
    event.fired().await;
    take_download(&sink)
}

/// One micro-batch's forward and backward passes on its stream. Returns its size, then its
/// loss and each trainable layer's weight and bias gradients.
async fn part_gradients<B: Backend>(
    b: &B,
    model: &Model,
    part: StagedPart<B>,
    kernels: &dyn KernelLayerRunner,
) -> Result<(usize, Vec<Vec<f32>>), ComputeError> {
    let (s, size) = (part.stream, part.size);
    let mut activations = vec![part.x];
    let mut weights = Vec::new();
    let last = model.layers.len() - 1;
    for (i, layer) in model.layers.iter().enumerate() {
        let p = Conv2dParams {
            batch: size,
            ..layer.params
        };
        let w = b.upload(s, Arc::new(layer.weight.clone()));
        let mut y = if layer.frozen {
            // Off the stream and back: the runner decides what computes this layer.
            let x = landed(b.download(s, &activations[i])).await?;
            let y = kernels.forward(i, layer, p, Arc::new(x)).await?;
            b.upload(s, Arc::new(y))
        } else {
            let bias = b.upload(s, Arc::new(layer.bias.clone()));
            b.launch(s, Op::Conv2d(p), &[&activations[i], &w, &bias])
                .swap_remove(0)
        };
        if i != last {
            y = b.launch(s, Op::Relu, &[&y]).swap_remove(0);
        }
        activations.push(y);
        weights.push((p, w));
    }
    let mut mse = b.launch(s, Op::Mse, &[&activations[last + 1], &part.target]);
    let mut dy = mse.pop().expect("the loss gradient");
    let mut downloads = vec![b.download(s, &mse[0])];
    // No gradient is needed below the lowest trainable layer.
    let lowest = model
        .layers
        .iter()
        .position(|l| !l.frozen)
        .unwrap_or(last + 1);
    let mut layer_grads = Vec::new();
    for i in (lowest..=last).rev() {
        if i != last {
            dy = b
                .launch(s, Op::ReluBackward, &[&activations[i + 1], &dy])
                .swap_remove(0);
        }
        let (p, w) = &weights[i];
        let mut g = b.launch(s, Op::Conv2dBackward(*p), &[&activations[i], w, &dy]);
        let db = g.pop().expect("db");
        let dw = g.pop().expect("dw");
        dy = g.pop().expect("dx");
        if !model.layers[i].frozen {
            layer_grads.push((dw, db));
        }
    }
    for (dw, db) in layer_grads.iter().rev() {
        downloads.push(b.download(s, dw));
        downloads.push(b.download(s, db));
    }
    let mut values = Vec::with_capacity(downloads.len());
    for download in downloads {
        values.push(landed(download).await?);
    }
    Ok((size, values))
}

impl Model {
    /// Forward pass, synchronously, each layer's conv2d on `par`'s threads.
    pub fn predict(&self, x: &[f32], batch: usize, par: Par) -> Result<Vec<f32>, ComputeError> {
        let mut a = x.to_vec();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let p = Conv2dParams {
                batch,
                ..layer.params
            };
            let mut y = super::recycle::take(p.output_len());
            super::conv::forward_into(&p, &a, &layer.weight, Some(&layer.bias), &mut y, par)?;
            super::recycle::give(std::mem::replace(&mut a, y));
            if i != last {
                super::ops::relu(&mut a);
            }
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu::{CpuBackend, InlineBackend};
    use crate::compute::engine::EngineConfig;

    /// Synthetic data: inputs from `seed`, targets from a fixed "teacher" model of the same
    /// shape (seeded apart from any student), so that the loss can go down.
    fn synthetic_batch(
        model: &Model,
        teacher: &Model,
        samples: usize,
        seed: u64,
    ) -> Result<(Vec<f32>, Vec<f32>), ComputeError> {
        let (in_size, _) = model.sample_sizes();
        let x = uniform(samples * in_size, seed, 1.0);
        let target = teacher.predict(&x, samples, Par::rayon(0))?;
        Ok((x, target))
    }

    fn specs() -> Vec<Conv2dSpec> {
        let conv = |c, k| Conv2dSpec {
            padding: [1, 1],
            ..Conv2dSpec::new(c, k, [3, 3])
        };
        vec![conv(3, 8), conv(8, 3)]
    }

    #[test]
    fn every_seed_initialises_a_model() {
        // Makes the first layer's seed u64::MAX: its bias's seed wraps around (an overflow
        // panic in builds with overflow checks, as the tests' and the demo's).
        let seed = 2_336_937_208_910_341_525;
        let model = Model::new(&specs(), [3, 8, 8], seed).unwrap();
        assert_eq!(model.layers[0].bias, uniform(8, 0, 1.0 / 27f32.sqrt()));
    }

    fn engine(streams: usize) -> Engine<CpuBackend> {
        Engine::new(
            Arc::new(CpuBackend::new(streams, 1)),
            EngineConfig {
                max_concurrent_ops: 16,
                fallback_on_error: false,
            },
        )
    }

    /// Four micro-batches on three streams (sizes 3, 3, 2, 2) give the gradients of one batch
    /// of 10: the same sums in another order, so equal within f32 rounding (1e-5 relative).
    #[tokio::test]
    async fn micro_batches_average_to_the_whole_batch() {
        let model = Model::new(&specs(), [3, 8, 8], 1).unwrap();
        let teacher = Model::new(&specs(), [3, 8, 8], 99).unwrap();
        let (x, t) = synthetic_batch(&model, &teacher, 10, 5).unwrap();
        let whole = gradients(&engine(1), &model, &x, &t, 10, 1).await.unwrap();
        let split = gradients(&engine(3), &model, &x, &t, 10, 4).await.unwrap();
        assert!((whole.loss - split.loss).abs() <= 1e-5 * whole.loss.abs().max(1.0));
        assert_eq!(whole.grads.len(), specs().len());
        assert_eq!(whole.grads.len(), split.grads.len());
        for ((w1, b1), (w2, b2)) in whole.grads.iter().zip(&split.grads) {
            assert_eq!((w1.len(), b1.len()), (w2.len(), b2.len()));
            assert!(!w1.is_empty());
            for (a, b) in w1.iter().chain(b1).zip(w2.iter().chain(b2)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    #[tokio::test]
    async fn training_lowers_the_loss() {
        let mut model = Model::new(&specs(), [3, 8, 8], 1).unwrap();
        let teacher = Model::new(&specs(), [3, 8, 8], 99).unwrap();
        let (x, t) = synthetic_batch(&model, &teacher, 16, 5).unwrap();
        let engine = engine(2);
        let first = gradients(&engine, &model, &x, &t, 16, 2).await.unwrap();
        let mut last = first.clone();
        for _ in 0..30 {
            model.apply(&last.grads, 0.05, 0.9);
            last = gradients(&engine, &model, &x, &t, 16, 2).await.unwrap();
        }
        assert!(
            last.loss < 0.5 * first.loss,
            "loss {} -> {}",
            first.loss,
            last.loss
        );
    }

    /// Counts the forward passes it runs, on the synchronous path.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl KernelLayerRunner for Counting {
        fn forward<'a>(
            &'a self,
            index: usize,
            layer: &'a Layer,
            params: Conv2dParams,
            x: Arc<Vec<f32>>,
        ) -> BoxFuture<'a, Result<Vec<f32>, ComputeError>> {
            assert_eq!(index, 0, "only layer 0 is frozen");
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            SyncPath.forward(index, layer, params, x)
        }
    }

    /// A frozen layer runs through the runner (once per micro-batch), gets no gradient and
    /// no update, and the layers above it get the gradients they would get on the stream.
    #[tokio::test]
    async fn frozen_layers_go_through_the_runner_and_stay_put() {
        let mut model = Model::new(&specs(), [3, 8, 8], 1).unwrap();
        let teacher = Model::new(&specs(), [3, 8, 8], 99).unwrap();
        let (x, t) = synthetic_batch(&model, &teacher, 6, 5).unwrap();
        let engine = engine(2);
        let on_stream = gradients(&engine, &model, &x, &t, 6, 2).await.unwrap();
        let kernel = model.layers[0].clone();
        model.freeze(0, &kernel.weight, Some(&kernel.bias)).unwrap();
        let runner = Counting(Default::default());
        let backend = engine.backend().as_ref();
        let staged = upload(backend, model.sample_sizes(), &x, &t, 6, 3).unwrap();
        let frozen = staged_gradients(backend, &model, staged, &runner)
            .await
            .unwrap();
        assert_eq!(runner.0.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert!((frozen.loss - on_stream.loss).abs() <= 1e-5 * on_stream.loss.abs().max(1.0));
        assert!(
            frozen.grads[0].0.iter().all(|g| *g == 0.0),
            "no gradient for a frozen layer"
        );
        assert_eq!(frozen.grads[1].0.len(), on_stream.grads[1].0.len());
        assert!(!frozen.grads[1].0.is_empty());
        for (a, b) in frozen.grads[1].0.iter().zip(&on_stream.grads[1].0) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
        model.apply(&frozen.grads, 0.1, 0.9);
        assert_eq!(
            model.layers[0],
            Layer {
                frozen: true,
                ..kernel
            }
        );
        assert_ne!(
            model.layers[1].weight,
            Model::new(&specs(), [3, 8, 8], 1).unwrap().layers[1].weight
        );
    }

    #[tokio::test]
    async fn layers_without_bias_keep_it_at_zero() {
        let mut s = specs();
        s[1].bias = false;
        let mut model = Model::new(&s, [3, 8, 8], 1).unwrap();
        let (x, t) =
            synthetic_batch(&model, &Model::new(&specs(), [3, 8, 8], 9).unwrap(), 4, 5).unwrap();
        let step = gradients(&engine(1), &model, &x, &t, 4, 1).await.unwrap();
        model.apply(&step.grads, 0.1, 0.9);
        assert!(model.layers[1].bias.iter().all(|b| *b == 0.0));
        assert!(model.layers[0].bias.iter().any(|b| *b != 0.0));
    }

    #[tokio::test]
    async fn the_state_dict_restores_weights_and_momentum() {
        let teacher = Model::new(&specs(), [3, 8, 8], 99).unwrap();
        let mut trained = Model::new(&specs(), [3, 8, 8], 1).unwrap();
        let (x, t) = synthetic_batch(&trained, &teacher, 4, 5).unwrap();
        let step = gradients(&engine(1), &trained, &x, &t, 4, 1).await.unwrap();
        trained.apply(&step.grads, 0.1, 0.9);
        let saved: std::collections::HashMap<String, Vec<f32>> = trained
            .state_dict()
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(saved.len(), 8);
        let mut restored = Model::new(&specs(), [3, 8, 8], 1).unwrap();
        restored.load_state_dict(|k| saved.get(k).cloned()).unwrap();
        assert_eq!(
            restored, trained,
            "velocities too, so the next step matches"
        );
        let err = restored.load_state_dict(|k| {
            saved
                .get(k)
                .filter(|_| !k.ends_with("bias_velocity"))
                .cloned()
        });
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("layers.0.bias_velocity")
        );
    }

    /// The synchronous backend runs the same ops with the same arithmetic: the same bits.
    #[tokio::test]
    async fn the_inline_backend_gives_the_streams_bits() {
        let model = Model::new(&specs(), [3, 8, 8], 1).unwrap();
        let teacher = Model::new(&specs(), [3, 8, 8], 99).unwrap();
        let (x, t) = synthetic_batch(&model, &teacher, 5, 5).unwrap();
        let streams = gradients(&engine(2), &model, &x, &t, 5, 2).await.unwrap();
        let inline = InlineBackend::new(1);
        let staged = upload(&inline, model.sample_sizes(), &x, &t, 5, 2).unwrap();
        let sync = staged_gradients(&inline, &model, staged, &SyncPath)
            .await
            .unwrap();
        assert_eq!(sync, streams);
    }

    #[test]
    fn layers_must_chain() {
        let mut s = specs();
        s[1].in_channels = 4;
        assert!(
            Model::new(&s, [3, 8, 8], 1)
                .unwrap_err()
                .to_string()
                .contains("layer 1 takes 4 channels but gets 8")
        );
    }
}
