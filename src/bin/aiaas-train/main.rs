//! Trains the three demo models of the seed text and traces each to TorchScript:
//!
//! - `regressor`: y = 3x + U(0,1) noise, one dense unit, SGD on mean squared error;
//! - `text-classifier`: embedding → masked mean pooling → dense → softmax over
//!   negative / positive, on the bundled Chinese and English corpus (`corpus.tsv`);
//! - `image-cnn`: the seed's network (3 conv/pool blocks, dense 512, softmax over 3) on generated
//!   circles, squares and triangles.
//!
//! `cargo run --release --bin aiaas-train -- --out models` rebuilds every artifact in `models/`
//! (model.pt, model.toml, tokenizer.json) from a fixed seed.

// pub, as an API: the tests and the benchmark include it by path for its PNG and JPEG encoders,
// which the trainer does not call
pub mod demo;
mod text;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{CModule, Device, Kind, Reduction, Tensor};

use demo::Shape;

/// Trains the demo models and writes them, traced to TorchScript, into a model repository.
#[derive(Debug, Parser)]
#[command(name = "aiaas-train", version, about)]
struct Args {
    /// Model repository to write into.
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// Train only these models (regressor, text-classifier, image-cnn).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Random seed (data and initialisation).
    #[arg(long, default_value_t = 20241130)]
    seed: u64,
    /// Training images per class for image-cnn.
    #[arg(long, default_value_t = 2500)]
    images_per_class: usize,
    /// Slope of the regressor's line (the seed uses 3; tests train other slopes to tell two
    /// versions of the model apart).
    #[arg(long, default_value_t = 3.0)]
    regressor_slope: f32,
    /// Epochs for image-cnn (the learning rate steps down over the last third).
    #[arg(long, default_value_t = 9)]
    image_epochs: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tch::manual_seed(args.seed as i64);
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let known = ["regressor", "text-classifier", "image-cnn"];
    if let Some(bad) = args.only.iter().find(|o| !known.contains(&o.as_str())) {
        bail!("unknown model '{bad}' (known: {})", known.join(", "));
    }
    if wanted("regressor") {
        regressor(&args.out.join("regressor"), args.seed, args.regressor_slope)?;
    }
    if wanted("text-classifier") {
        text::train(&args.out.join("text-classifier"), args.seed)?;
    }
    if wanted("image-cnn") {
        image_cnn(&args.out.join("image-cnn"), &args)?;
    }
    Ok(())
}

/// A progress bar with a message slot for loss and accuracy.
pub fn progress(len: u64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>16} [{bar:30}] {pos:>5}/{len:5} {elapsed_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

/// Finishes a bar with a summary; when stderr is not a terminal (CI logs) the bar is hidden, so
/// the summary is printed as a plain line instead.
pub fn finish(pb: &ProgressBar, message: String) {
    if pb.is_hidden() {
        println!("{} {message}", pb.prefix().trim());
    }
    pb.finish_with_message(message);
}

/// Traces `forward` on `example` under no_grad and saves the TorchScript module.
pub fn trace_and_save(
    name: &str,
    example: &Tensor,
    forward: &dyn Fn(&Tensor) -> Tensor,
    path: &Path,
) -> Result<CModule> {
    let module = tch::no_grad(|| {
        CModule::create_by_tracing(
            name,
            "forward",
            std::slice::from_ref(example),
            &mut |inputs| vec![forward(&inputs[0])],
        )
    })
    .with_context(|| format!("tracing {name}"))?;
    module
        .save(path)
        .with_context(|| format!("saving {}", path.display()))?;
    CModule::load(path).with_context(|| format!("re-loading {}", path.display()))
}

/// The traced module must agree with the eager model on inputs of another batch size.
pub fn check_trace(module: &CModule, eager: &Tensor, input: &Tensor) -> Result<()> {
    let traced = tch::no_grad(|| module.forward_ts(&[input]))?;
    let diff = (traced - eager).abs().max().double_value(&[]);
    if diff > 1e-4 {
        bail!("traced module differs from the eager model by {diff}");
    }
    Ok(())
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn regressor(dir: &Path, seed: u64, slope: f32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let started = Instant::now();
    // The seed's data: 100 samples of x in [0,1), y = 3x + U(0,1) noise.
    let mut rng = StdRng::seed_from_u64(seed);
    let xs: Vec<f32> = (0..100).map(|_| rng.random_range(0.0..1.0)).collect();
    let ys: Vec<f32> = xs
        .iter()
        .map(|x| slope * x + rng.random_range(0.0..1.0))
        .collect();
    let x = Tensor::from_slice(&xs).view([-1, 1]);
    let y = Tensor::from_slice(&ys).view([-1, 1]);

    let vs = nn::VarStore::new(Device::Cpu);
    let dense = nn::linear(vs.root() / "dense", 1, 1, Default::default());
    let mut opt = nn::Sgd::default().build(&vs, 0.1)?;
    let epochs = 1000;
    let pb = progress(epochs, "regressor");
    let mut loss_value = 0.0;
    for epoch in 1..=epochs {
        let loss = dense.forward(&x).mse_loss(&y, Reduction::Mean);
        opt.backward_step(&loss);
        if epoch % 50 == 0 || epoch == epochs {
            loss_value = loss.double_value(&[]);
            pb.set_message(format!("loss {loss_value:.4}"));
        }
        pb.inc(1);
    }
    finish(&pb, format!("loss {loss_value:.4}"));
    let mut vs = vs;
    vs.freeze();
    let path = dir.join("model.pt");
    let module = trace_and_save(
        "Regressor",
        &Tensor::zeros([1, 1], (Kind::Float, Device::Cpu)),
        &|t| dense.forward(t),
        &path,
    )?;
    let probe = Tensor::from_slice(&[0.0f32, 0.5, 1.0]).view([-1, 1]);
    check_trace(&module, &tch::no_grad(|| dense.forward(&probe)), &probe)?;
    let at_half =
        tch::no_grad(|| module.forward_ts(&[Tensor::from_slice(&[0.5f32]).view([1, 1])]))?
            .double_value(&[0, 0]);
    let w = dense.ws.double_value(&[0, 0]);
    let b = dense.bs.as_ref().map_or(0.0, |b| b.double_value(&[0]));
    println!(
        "regressor: y = {w:.3}x + {b:.3} (expected about {slope}x + 0.5), MSE {loss_value:.4}, f(0.5) = {at_half:.3}, {:.1}s",
        started.elapsed().as_secs_f64()
    );
    write(
        &dir.join("model.toml"),
        r#"# y = 3x + U(0,1) noise: the seed text's first example (one dense unit, SGD, MSE).
kind = "regressor"
description = "Linear regression y = 3x + noise (seed example 4.1)"
file = "model.pt"
device = "auto"

[batching]
max_batch_size = 64
max_queue_delay_ms = 0.0
queue_capacity = 4096

[[inputs]]
name = "x"
datatype = "FP32"
dims = [1]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [1]
"#,
    )
}

/// Images as a `[N, 3, H, W]` float tensor in 0..1 and their class indices.
fn image_batch(images: &[(image::RgbImage, usize)]) -> (Tensor, Tensor) {
    let n = images.len() as i64;
    let (w, h) = images[0].0.dimensions();
    let mut data = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for (img, _) in images {
        data.extend_from_slice(img.as_raw());
    }
    let x = Tensor::from_slice(&data)
        .view([n, h as i64, w as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    let labels: Vec<i64> = images.iter().map(|(_, l)| *l as i64).collect();
    (x.contiguous(), Tensor::from_slice(&labels))
}

fn generate(per_class: usize, rng: &mut StdRng) -> Vec<(image::RgbImage, usize)> {
    let mut out = Vec::with_capacity(per_class * 3);
    for _ in 0..per_class {
        for shape in Shape::ALL {
            out.push((demo::draw(shape, 64, rng), shape.index()));
        }
    }
    out
}

struct Cnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    conv3: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Cnn {
    /// Exactly the seed's network: Conv(3→32,3x3)+ReLU, MaxPool 2, Conv(32→64)+ReLU, MaxPool,
    /// Conv(64→128)+ReLU, MaxPool, Flatten, Dense 512+ReLU, Dense 3 (+ softmax when serving).
    fn new(vs: &nn::Path) -> Self {
        let c = Default::default();
        Self {
            conv1: nn::conv2d(vs / "conv1", 3, 32, 3, c),
            conv2: nn::conv2d(vs / "conv2", 32, 64, 3, c),
            conv3: nn::conv2d(vs / "conv3", 64, 128, 3, c),
            fc1: nn::linear(vs / "fc1", 128 * 6 * 6, 512, Default::default()),
            fc2: nn::linear(vs / "fc2", 512, 3, Default::default()),
        }
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv3)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

fn image_cnn(dir: &Path, args: &Args) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x1a6e);
    let gen = progress(2, "image-cnn data");
    gen.set_message(format!(
        "{} training + 300 held-out images per class",
        args.images_per_class
    ));
    let train = generate(args.images_per_class, &mut rng);
    gen.inc(1);
    let held_out = generate(300, &mut rng);
    gen.inc(1);
    finish(
        &gen,
        format!("{} images generated", 3 * (args.images_per_class + 300)),
    );
    let (train_x, train_y) = image_batch(&train);
    let (test_x, test_y) = image_batch(&held_out);
    drop((train, held_out));

    let vs = nn::VarStore::new(Device::Cpu);
    let net = Cnn::new(&vs.root());
    let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
    let batch = 64;
    let n = train_x.size()[0];
    let steps = (n + batch - 1) / batch;
    let mut test_acc = 0.0;
    for epoch in 1..=args.image_epochs {
        // 1e-3, then 3e-4 and 1e-4 over the last third
        let third = args.image_epochs.div_ceil(3);
        let lr = match args.image_epochs - epoch {
            r if r >= third => 1e-3,
            r if r >= third / 2 => 3e-4,
            _ => 1e-4,
        };
        opt.set_lr(lr);
        let pb = progress(
            steps as u64,
            &format!("image-cnn {epoch}/{}", args.image_epochs),
        );
        let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        let (mut loss_sum, mut acc_sum) = (0.0, 0.0);
        for step in 0..steps {
            let idx = perm.narrow(0, step * batch, batch.min(n - step * batch));
            let (x, y) = (train_x.index_select(0, &idx), train_y.index_select(0, &idx));
            let logits = net.logits(&x);
            let loss = logits.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            loss_sum += loss.double_value(&[]);
            acc_sum += accuracy(&logits, &y);
            let k = (step + 1) as f64;
            pb.set_message(format!(
                "loss {:.4} acc {:.1}%",
                loss_sum / k,
                100.0 * acc_sum / k
            ));
            pb.inc(1);
        }
        test_acc = tch::no_grad(|| accuracy(&net.logits(&test_x), &test_y));
        finish(
            &pb,
            format!(
                "loss {:.4} acc {:.1}% held-out acc {:.1}%",
                loss_sum / steps as f64,
                100.0 * acc_sum / steps as f64,
                100.0 * test_acc
            ),
        );
    }
    println!(
        "image-cnn: held-out accuracy {:.2}% on {} images, {:.1}s",
        100.0 * test_acc,
        test_y.size()[0],
        started.elapsed().as_secs_f64()
    );
    if test_acc < 0.95 {
        bail!(
            "image-cnn held-out accuracy {:.2}% is below 95%",
            100.0 * test_acc
        );
    }
    let mut vs = vs;
    vs.freeze();
    let path = dir.join("model.pt");
    let probs = |x: &Tensor| net.logits(x).softmax(-1, Kind::Float);
    let module = trace_and_save("ImageCnn", &test_x.narrow(0, 0, 1), &probs, &path)?;
    let probe = test_x.narrow(0, 0, 7);
    check_trace(&module, &tch::no_grad(|| probs(&probe)), &probe)?;
    write(
        &dir.join("model.toml"),
        r#"# The seed text's image example: 3 conv/pool blocks, dense 512, softmax over 3 classes.
kind = "image-classifier"
description = "Shape classifier (circle, square, triangle) on 64x64 RGB images (seed example 4.3)"
file = "model.pt"
device = "auto"
# Two single-threaded engine instances beat one two-threaded instance on a 2-core CPU by about
# 30% under load (docs/BENCHMARKS.md); intra_op_threads defaults to cores / instances.
instances = 2

# No waiting for a batch to fill: under load, requests queue while both instances compute and
# form batches by themselves; a lone request is not delayed (measured in docs/BENCHMARKS.md).
[batching]
max_batch_size = 32
max_queue_delay_ms = 0.0
queue_capacity = 1024

# Decoded images are converted to RGB, resized to 64x64 and scaled to 0..1 (pixel / 255).
[image]
width = 64
height = 64
channels = 3
scale = 0.00392156862745098

[output]
labels = ["circle", "square", "triangle"]
softmax = false  # the model already returns probabilities
"#,
    )
}

#[cfg(test)]
mod demo_tests {
    use super::demo::{draw, jpeg, png, Shape};
    use rand::SeedableRng;

    #[test]
    fn shapes_cover_a_plausible_share_of_the_image() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for shape in Shape::ALL {
            let img = draw(shape, 64, &mut rng);
            assert_eq!(img.dimensions(), (64, 64));
            assert!(!png(&img).is_empty());
            assert!(!jpeg(&img, 90).is_empty());
        }
    }
}
