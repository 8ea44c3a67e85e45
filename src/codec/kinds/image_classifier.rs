//! `image-classifier`: encoded images (PNG, JPEG: a raw body, `{"b64": ...}`, v2 BYTES) or
//! pixel arrays, pre-processed to the model's CHW input; answers labels and scores.

use serde_json::Value;

use serde::Deserialize;

use super::classifier::{scores_output, Classifier, OutputSpec};
use super::{bytes_rows, tables, Declaration, Declared, Kind, ModelAdapter};
use crate::codec::image::{Crop, ImageSpec, Resize};
use crate::codec::v2::{V2Data, V2Input, V2Output, V2TensorMeta};
use crate::codec::{CodecError, ImageCodec, Instance, OutputOptions};
use crate::config::model_spec::{ModelSpec, Signature, TensorSpec};
use crate::tensor::DType;
use crate::tensor::{Inferred, Item};

pub const KIND: Kind = Kind {
    name: "image-classifier",
    declare,
    adapter: |spec, limits| {
        let t: Tables = tables(spec)?;
        Ok(Box::new(ImageClassifier {
            signature: spec.signature(),
            image: ImageCodec::new(image_table(t.image)?, limits.image),
            classifier: Classifier::new(spec, &t.output),
        }))
    },
};

/// The model.toml tables of an image classifier.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    image: Option<ImageSpec>,
    #[serde(default)]
    output: OutputSpec,
}

fn image_table(image: Option<ImageSpec>) -> Result<ImageSpec, String> {
    image.ok_or_else(|| "kind image-classifier needs an [image] table (width, height)".into())
}

/// An `[image]` table that makes sense, labels, and the input `image` FP32
/// `[channels, height, width]` and output `scores` `[labels]` unless declared; 4-D inputs go
/// channels-last.
fn declare(spec: &ModelSpec, d: Declared) -> Result<Declaration, String> {
    let t: Tables = tables(spec)?;
    let img = image_table(t.image)?;
    if img.width == 0 || img.height == 0 {
        return Err("image.width and image.height must be positive".into());
    }
    if img.channels != 1 && img.channels != 3 {
        return Err("image.channels must be 1 (grey) or 3 (RGB)".into());
    }
    for (what, v) in [("mean", &img.mean), ("std", &img.std)] {
        if let Some(v) = v {
            if v.len() != img.channels {
                return Err(format!(
                    "image.{what} needs {} values, one per channel",
                    img.channels
                ));
            }
        }
    }
    if img.std().contains(&0.0) {
        return Err("image.std must not contain 0".into());
    }
    match (img.resize, img.crop) {
            (Resize::Stretch, Crop::Center) => {
                return Err("image.crop = \"center\" needs resize = \"shorter-side\" (a stretched image is already width x height)".into())
            }
            (Resize::Stretch, Crop::None) if img.resize_to.is_some() => {
                return Err("image.resize_to needs resize = \"shorter-side\"".into())
            }
            (Resize::ShorterSide, Crop::None) => {
                return Err("resize = \"shorter-side\" needs crop = \"center\": the resized image is not width x height otherwise".into())
            }
            (Resize::ShorterSide, Crop::Center) => {
                let to = img.resize_to.unwrap_or(img.width.max(img.height));
                if to < img.width.max(img.height) {
                    return Err(format!(
                        "image.resize_to {to} is smaller than the {}x{} centre crop",
                        img.width, img.height
                    ));
                }
            }
            _ => {}
        }
    let labels = t.output.labels(spec)?;
    if labels.is_empty() {
        return Err("an image-classifier needs output.labels or output.labels_file".into());
    }
    let dims = vec![img.channels as i64, img.height as i64, img.width as i64];
    Ok(Declaration {
        signature: Signature::new(
            d.inputs
                .unwrap_or_else(|| vec![TensorSpec::new("image", DType::Fp32, dims)]),
            d.outputs
                .unwrap_or_else(|| vec![scores_output(labels.len())]),
        ),
        labels,
        channels_last: true,
        max_text_length: None,
    })
}

pub struct ImageClassifier {
    signature: Signature,
    image: ImageCodec,
    classifier: Classifier,
}

impl ModelAdapter for ImageClassifier {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn decode_instance(&self, instance: &Instance) -> Result<Item, CodecError> {
        let pixels = match instance {
            Instance::Object(o) if o.contains_key("b64") => {
                let b64 = o["b64"].as_str().ok_or_else(|| {
                    CodecError::Invalid("\"b64\" must be a base64 string".into())
                })?;
                self.image.decode_base64(b64)?
            }
            Instance::Array { values, shape } => self.image.decode_pixels(values, shape)?,
            other => {
                return Err(CodecError::Invalid(format!(
                    "an image instance is {{\"b64\": \"<base64 PNG or JPEG>\"}} or an array of pixel values, got {}",
                    other.json_type()
                )))
            }
        };
        Ok(Item::new(vec![pixels]))
    }

    fn takes_encoded(&self) -> bool {
        true
    }

    fn decode_encoded(&self, bytes: &[u8]) -> Result<Item, CodecError> {
        Ok(Item::new(vec![self.image.decode(bytes)?]))
    }

    fn encode_prediction(&self, result: &Inferred, opts: OutputOptions) -> Value {
        self.classifier.prediction(&result.outputs, opts)
    }

    fn v2_outputs(&self) -> Vec<V2TensorMeta> {
        self.classifier.v2_outputs(&self.signature)
    }

    /// The pre-processed FP32 tensor, or BYTES: encoded images under the same input name.
    fn decode_v2(&self, mut inputs: Vec<V2Input>) -> Result<(Vec<Item>, usize), CodecError> {
        if !matches!(inputs[0].data, V2Data::Bytes(_)) {
            return super::tensor_item(inputs, &self.signature.inputs);
        }
        let input = inputs.pop().expect("one declared input");
        let images = bytes_rows(&input, "encoded images")?;
        let items = images
            .iter()
            .map(|b| self.decode_encoded(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, images.len()))
    }

    fn encode_v2(&self, results: &[Inferred], wanted: &dyn Fn(&str) -> bool) -> Vec<V2Output> {
        self.classifier.encode_v2(results, &self.signature, wanted)
    }
}
