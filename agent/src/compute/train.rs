//! Training: a stack of conv2d layers (ReLU between them) fitted by SGD with momentum to an
//! MSE loss, one step at a time, with the batch split into micro-batches on several streams.

use std::sync::Arc;

use kernelflow_crds::Conv2dSpec;

use super::ComputeError;
use super::backend::{Backend, Op};
use super::conv::Conv2dParams;
use super::engine::Engine;
use super::ops::{sgd, uniform};

/// One layer's parameters and optimiser state.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    /// Parameters for a batch of one sample.
    pub params: Conv2dParams,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
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
                bias: uniform(params.out_channels, layer_seed + 1, scale),
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

    /// Applies averaged gradients: one SGD-with-momentum step.
    pub fn apply(&mut self, grads: &[(Vec<f32>, Vec<f32>)], learning_rate: f32, momentum: f32) {
        for (layer, (dw, db)) in self.layers.iter_mut().zip(grads) {
            sgd(
                &mut layer.weight,
                dw,
                &mut layer.weight_velocity,
                learning_rate,
                momentum,
            );
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

/// Mean loss and mean gradients (per layer: weight, bias) of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    pub loss: f32,
    pub grads: Vec<(Vec<f32>, Vec<f32>)>,
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
    let (in_size, out_size) = model.sample_sizes();
    if x.len() != batch * in_size || target.len() != batch * out_size || batch == 0 {
        return Err(ComputeError::Shape(format!(
            "a batch of {batch} needs {} inputs and {} targets",
            batch * in_size,
            batch * out_size
        )));
    }
    let parts = micro_batches.clamp(1, batch);
    let backend = engine.backend();
    let mut pending = Vec::new();
    let mut start = 0;
    for part in 0..parts {
        let size = batch / parts + usize::from(part < batch % parts);
        let stream = part % backend.streams();
        let xs = Arc::new(x[start * in_size..(start + size) * in_size].to_vec());
        let ts = Arc::new(target[start * out_size..(start + size) * out_size].to_vec());
        start += size;
        pending.push((
            size,
            enqueue_part(backend.as_ref(), stream, model, size, xs, ts),
        ));
    }
    let mut loss = 0.0;
    let mut grads: Vec<(Vec<f32>, Vec<f32>)> = model
        .layers
        .iter()
        .map(|l| (vec![0.0; l.weight.len()], vec![0.0; l.bias.len()]))
        .collect();
    for (size, downloads) in pending {
        let share = size as f32 / batch as f32;
        let mut values = Vec::with_capacity(downloads.len());
        for (event, sink) in downloads {
            event.fired().await;
            values.push(
                sink.lock()
                    .expect("download lock")
                    .take()
                    .unwrap_or_else(|| Err(ComputeError::Stopped("download lost".into())))?,
            );
        }
        let mut values = values.into_iter();
        loss += share * values.next().expect("the loss")[0];
        for (dw, db) in grads.iter_mut() {
            for (acc, v) in [(dw, values.next()), (db, values.next())] {
                acc.iter_mut()
                    .zip(v.expect("a gradient"))
                    .for_each(|(a, g)| *a += share * g);
            }
        }
    }
    Ok(StepResult { loss, grads })
}

type Downloads = Vec<(super::backend::Event, super::backend::Download)>;

/// Enqueues one micro-batch's forward and backward passes; returns downloads of its loss
/// and of each layer's weight and bias gradients.
fn enqueue_part<B: Backend>(
    b: &B,
    s: usize,
    model: &Model,
    size: usize,
    x: Arc<Vec<f32>>,
    target: Arc<Vec<f32>>,
) -> Downloads {
    let mut activations = vec![b.upload(s, x)];
    let mut weights = Vec::new();
    let last = model.layers.len() - 1;
    for (i, layer) in model.layers.iter().enumerate() {
        let p = Conv2dParams {
            batch: size,
            ..layer.params
        };
        let w = b.upload(s, Arc::new(layer.weight.clone()));
        let bias = b.upload(s, Arc::new(layer.bias.clone()));
        let mut y = b
            .launch(s, Op::Conv2d(p), &[&activations[i], &w, &bias])
            .swap_remove(0);
        if i != last {
            y = b.launch(s, Op::Relu, &[&y]).swap_remove(0);
        }
        activations.push(y);
        weights.push((p, w));
    }
    let target = b.upload(s, target);
    let mut mse = b.launch(s, Op::Mse, &[&activations[last + 1], &target]);
    let mut dy = mse.pop().expect("the loss gradient");
    let mut downloads = vec![b.download(s, &mse[0])];
    let mut layer_grads = Vec::new();
    for i in (0..=last).rev() {
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
        layer_grads.push((dw, db));
    }
    for (dw, db) in layer_grads.iter().rev() {
        downloads.push(b.download(s, dw));
        downloads.push(b.download(s, db));
    }
    downloads
}

/// Synthetic data: inputs from `seed`, targets from a fixed "teacher" model of the same
/// shape (seeded apart from any student), so that the loss can go down.
pub fn synthetic_batch(
    model: &Model,
    teacher: &Model,
    samples: usize,
    seed: u64,
) -> Result<(Vec<f32>, Vec<f32>), ComputeError> {
    let (in_size, _) = model.sample_sizes();
    let x = uniform(samples * in_size, seed, 1.0);
    let target = teacher.predict(&x, samples)?;
    Ok((x, target))
}

impl Model {
    /// Forward pass on the calling thread.
    pub fn predict(&self, x: &[f32], batch: usize) -> Result<Vec<f32>, ComputeError> {
        let mut a = x.to_vec();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let p = Conv2dParams {
                batch,
                ..layer.params
            };
            a = super::conv::forward(
                &p,
                &a,
                &layer.weight,
                Some(&layer.bias),
                faer::Par::rayon(0),
            )?;
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
    use crate::compute::cpu::CpuBackend;
    use crate::compute::engine::EngineConfig;

    fn specs() -> Vec<Conv2dSpec> {
        let conv = |c, k| Conv2dSpec {
            padding: [1, 1],
            ..Conv2dSpec::new(c, k, [3, 3])
        };
        vec![conv(3, 8), conv(8, 3)]
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
        for ((w1, b1), (w2, b2)) in whole.grads.iter().zip(&split.grads) {
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
