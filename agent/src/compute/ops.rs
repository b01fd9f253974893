//! Element-wise ops of training: ReLU, mean squared error, SGD with momentum; and the
//! deterministic generator that initialises weights and synthetic data.

/// Deterministic values uniform in `[-scale, scale)` from `seed` (SplitMix64): the same on
/// every machine, so a job's seed fixes its weights and data.
pub fn uniform(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    uniform_at(0, len, seed, scale)
}

/// Values `offset..offset + len` of the endless sequence that [`uniform`] starts: any part of
/// a synthetic data set, without generating what comes before it.
pub fn uniform_at(offset: u64, len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_add(offset.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 24 random bits -> [0, 1), exactly representable in f32.
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * scale
        })
        .collect()
}

/// `max(x, 0)` in place.
pub fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// Gradient through ReLU: zero where the forward output `y` was not positive.
pub fn relu_backward(y: &[f32], dy: &mut [f32]) {
    dy.iter_mut().zip(y).for_each(|(g, y)| {
        if *y <= 0.0 {
            *g = 0.0;
        }
    });
}

/// Mean squared error and its gradient with respect to `prediction`.
pub fn mse(prediction: &[f32], target: &[f32]) -> (f32, Vec<f32>) {
    let n = prediction.len().max(1) as f32;
    let mut loss = 0.0f64;
    let grad = prediction
        .iter()
        .zip(target)
        .map(|(p, t)| {
            let d = p - t;
            loss += f64::from(d) * f64::from(d);
            2.0 * d / n
        })
        .collect();
    ((loss / f64::from(n)) as f32, grad)
}

/// One SGD step with momentum (PyTorch's form): `v = m*v + g; w -= lr*v`.
pub fn sgd(
    weights: &mut [f32],
    grad: &[f32],
    velocity: &mut [f32],
    learning_rate: f32,
    momentum: f32,
) {
    for ((w, g), v) in weights.iter_mut().zip(grad).zip(velocity.iter_mut()) {
        *v = momentum * *v + g;
        *w -= learning_rate * *v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_deterministic_and_in_range() {
        let a = uniform(1000, 7, 0.5);
        assert_eq!(a, uniform(1000, 7, 0.5));
        assert_ne!(a, uniform(1000, 8, 0.5));
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let mean: f32 = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.05, "{mean}");
        assert_eq!(uniform_at(300, 700, 7, 0.5), a[300..]);
    }

    #[test]
    fn relu_and_its_gradient() {
        let mut x = vec![-1.0, 0.0, 2.0];
        relu(&mut x);
        assert_eq!(x, [0.0, 0.0, 2.0]);
        let mut g = vec![5.0, 5.0, 5.0];
        relu_backward(&x, &mut g);
        assert_eq!(g, [0.0, 0.0, 5.0]);
    }

    #[test]
    fn mse_gradient_matches_finite_differences() {
        let p = uniform(10, 1, 1.0);
        let t = uniform(10, 2, 1.0);
        let (_, g) = mse(&p, &t);
        for i in 0..p.len() {
            let h = 1e-3;
            let (mut up, mut down) = (p.clone(), p.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (mse(&up, &t).0 - mse(&down, &t).0) / (2.0 * h);
            assert!((numeric - g[i]).abs() < 1e-3, "{i}: {numeric} vs {}", g[i]);
        }
    }

    #[test]
    fn sgd_with_momentum_accumulates_velocity() {
        let (mut w, mut v) = (vec![1.0], vec![0.0]);
        sgd(&mut w, &[1.0], &mut v, 0.1, 0.9);
        assert_eq!((w[0], v[0]), (0.9, 1.0));
        sgd(&mut w, &[1.0], &mut v, 0.1, 0.9);
        assert!((w[0] - 0.71).abs() < 1e-6 && (v[0] - 1.9).abs() < 1e-6);
    }
}
