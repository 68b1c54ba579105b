//! Synthetic embeddings for benchmarks and the GPU self-test, shaped like real ones: points
//! of a low-dimensional latent space (a mixture of `clusters` Gaussian blobs in
//! [`LATENT`] dimensions, overlapping), mapped into `dim` dimensions by a fixed random
//! projection, with a little isotropic noise, normalised to unit length. Nearest neighbours
//! are then local in a continuous space, so approximate indexes show the recall curves they
//! show on real embeddings; isotropic noise alone has no neighbours worth finding, and
//! well-separated blobs make every index look perfect. Deterministic per seed.

use rand::{Rng, SeedableRng};

/// Latent dimensions.
pub const LATENT: usize = 24;

/// `n` unit vectors of dimension `dim`. `seed` fixes the space (blob centres, projection),
/// `draw` the points: the same pair gives the same vectors.
pub fn clustered(n: usize, dim: usize, clusters: usize, seed: u64, draw: u64) -> Vec<f32> {
    let mut space = rand::rngs::StdRng::seed_from_u64(seed);
    let clusters = clusters.max(1);
    let centres: Vec<f32> = (0..clusters * LATENT).map(|_| gauss(&mut space)).collect();
    let scale = 1.0 / (LATENT as f32).sqrt();
    let projection: Vec<f32> = (0..dim * LATENT).map(|_| gauss(&mut space) * scale).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(draw);
    let noise = 0.15 / (dim as f32).sqrt();
    let mut out = vec![0f32; n * dim];
    let mut z = [0f32; LATENT];
    for v in out.chunks_exact_mut(dim) {
        let c = rng.random_range(0..clusters);
        for (zi, m) in z.iter_mut().zip(&centres[c * LATENT..(c + 1) * LATENT]) {
            *zi = m + 0.7 * gauss(&mut rng);
        }
        let norm = z.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::EPSILON);
        for (x, row) in v.iter_mut().zip(projection.chunks_exact(LATENT)) {
            *x = row.iter().zip(&z).map(|(p, zi)| p * zi).sum::<f32>() / norm + noise * gauss(&mut rng);
        }
        super::normalize(v);
    }
    out
}

/// A standard normal sample (Box–Muller).
fn gauss(rng: &mut impl Rng) -> f32 {
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random_range(0.0..1.0));
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}
