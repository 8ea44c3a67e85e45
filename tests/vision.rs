//! torchvision's resnet18 (random weights, traced by `tests/fixtures/hf/build.py`) behind
//! `resize = "shorter-side"` + `crop = "center"`, against torchvision's own preprocessing
//! (`Resize(256)`, `CenterCrop(224)`, `ToTensor`, `Normalize`) and model.
//!
//! What is compared: the pre-processed tensor with torchvision's, element by element, within
//! the resize filter's rounding (PIL and the `image` crate both antialias a shrink, but round
//! differently: 1-2 levels of 255 on a few pixels); the model's answer for torchvision's own
//! tensor exactly (1e-4, the same forward); and for a JPEG, the logits as the server's
//! probabilities show them.

pub mod common;

use serde_json::{json, Value};

use aiaas::codec::image::{Crop, ImageSpec, Resize};
use aiaas::codec::{ImageCodec, ImageLimits};
use aiaas::registry::spec::load_spec;
use common::*;
use serde::Deserialize;

fn fixture() -> std::path::PathBuf {
    common::hf::fixtures().join("resnet18")
}

fn reference() -> Value {
    common::hf::reference("resnet18")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// (max, mean) absolute difference.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
    let max = d.iter().copied().fold(0.0, f32::max);
    (max, d.iter().sum::<f32>() / d.len() as f32)
}

fn codec(image: &ImageSpec) -> ImageCodec {
    ImageCodec::new(image.clone(), ImageLimits::default())
}

#[test]
fn shorter_side_and_centre_crop_preprocess_as_torchvision() {
    let dir = fixture();
    let spec = load_spec("resnet18", &dir.join("model.toml"), &dir).unwrap();
    let spec = ImageSpec::deserialize(spec.tables["image"].clone()).unwrap();
    let mut stretched = spec.clone();
    stretched.resize = Resize::Stretch;
    stretched.crop = Crop::None;
    stretched.resize_to = None;
    for img in reference()["images"].as_array().unwrap() {
        let expected = f32s(
            &std::fs::read(
                dir.join(
                    img["file"]
                        .as_str()
                        .unwrap()
                        .replace(".jpg", ".preprocessed.f32.bin"),
                ),
            )
            .unwrap(),
        );
        for file in [img["file"].as_str().unwrap(), img["png"].as_str().unwrap()] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let ours = codec(&spec).decode(&bytes).unwrap();
            assert_eq!(ours.shape, vec![1, 3, 224, 224]);
            let (max, mean) = diff(&ours.to_f32_vec(), &expected);
            println!("{file}: max |ours - torchvision| {max:.4}, mean {mean:.5}");
            assert!(max < 0.07 && mean < 0.005, "{file}: max {max}, mean {mean}");
            // the check can tell: a stretched image is far off
            let (_, wrong) = diff(
                &codec(&stretched).decode(&bytes).unwrap().to_f32_vec(),
                &expected,
            );
            assert!(
                wrong > 10.0 * mean.max(0.002),
                "{file}: stretch differs by only {wrong}"
            );
        }
    }
}

fn logits_of(probabilities: &[f64]) -> Vec<f64> {
    // log p = logit - logsumexp: equal to the logits up to a constant; centre both
    let logs: Vec<f64> = probabilities.iter().map(|p| p.ln()).collect();
    centred(&logs)
}

fn centred(v: &[f64]) -> Vec<f64> {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().map(|x| x - mean).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resnet18_answers_as_torchvision_with_the_best_five_of_1000_labels() {
    let dir = fixture();
    let s = Server::start(dir.parent().unwrap(), &["--load-model", "resnet18"]);
    s.wait_ready();
    let c = client();
    let reference = reference();
    for img in reference["images"].as_array().unwrap() {
        let ref_logits = centred(
            &img["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>(),
        );
        // torchvision's own tensor through v2: the same forward pass
        let tensor = std::fs::read(
            dir.join(
                img["file"]
                    .as_str()
                    .unwrap()
                    .replace(".jpg", ".preprocessed.f32.bin"),
            ),
        )
        .unwrap();
        let header =
            json!({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32",
            "parameters": {"binary_data_size": tensor.len()}}], "outputs": [{"name": "scores"}]})
            .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&tensor);
        let r = send(
            c.post(s.url("/v2/models/resnet18/infer"))
                .header("Inference-Header-Content-Length", header.len().to_string())
                .body(body),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let probs: Vec<f64> = r.json()["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let exact = max_diff(&logits_of(&probs), &ref_logits);
        assert!(exact < 1e-4, "same tensor, logits differ by {exact}");

        // the JPEG through /v1: its best five by default, no 1000 scores
        let jpeg = std::fs::read(dir.join(img["file"].as_str().unwrap())).unwrap();
        let url = s.url("/v1/models/resnet18/predict");
        let r = send(
            c.post(&url)
                .header("content-type", "image/jpeg")
                .body(jpeg.clone()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let p = &r.json()["predictions"][0];
        assert!(p.get("scores").is_none(), "{p}");
        let top: Vec<&str> = p["top_k"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["label"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = img["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["label"].as_str().unwrap())
            .collect();
        assert_eq!(top, expected);
        assert_eq!(p["label"], expected[0]);
        // every score when asked: the logits within the resize filter's rounding
        let r = send(
            c.post(format!("{url}?scores=all"))
                .header("content-type", "image/jpeg")
                .body(jpeg),
        )
        .await;
        let scores = &r.json()["predictions"][0]["scores"];
        let probs: Vec<f64> = (0..1000)
            .map(|i| scores[format!("class-{i}")].as_f64().unwrap())
            .collect();
        let jpeg_diff = max_diff(&logits_of(&probs), &ref_logits);
        let range = ref_logits.iter().copied().fold(f64::MIN, f64::max)
            - ref_logits.iter().copied().fold(f64::MAX, f64::min);
        println!(
            "{}: logits differ by {jpeg_diff:.4} (range {range:.2}); same tensor {exact:.2e}",
            img["file"]
        );
        assert!(
            jpeg_diff < 0.005 * range,
            "{jpeg_diff} of a range of {range}"
        );
    }
}
