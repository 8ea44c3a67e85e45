//! Entry points for the fuzz targets (`tests/fuzz`) and their regression tests: each feeds
//! arbitrary bytes to one input decoder. None may panic, whatever the bytes.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value;

use crate::codec::image::ImageSpec;
use crate::codec::tokenizer::TextSpec;
use crate::codec::{ImageCodec, ImageLimits, Instance, ModelCodec};
use crate::registry::spec::parse_spec;

fn limits() -> ImageLimits {
    ImageLimits {
        max_width: 2048,
        max_height: 2048,
        max_alloc: 64 << 20,
        ..ImageLimits::default()
    }
}

/// Image decoding and pre-processing (PNG, JPEG, anything the decoder guesses).
pub fn image_decode(data: &[u8]) {
    static CODEC: OnceLock<ImageCodec> = OnceLock::new();
    let codec = CODEC.get_or_init(|| {
        ImageCodec::new(
            ImageSpec {
                width: 64,
                height: 64,
                channels: 3,
                scale: 1.0 / 255.0,
                mean: None,
                std: None,
                resize: Default::default(),
                resize_to: None,
                crop: Default::default(),
                interpolation: Default::default(),
            },
            limits(),
        )
    });
    let _ = codec.decode(data);
}

/// The v2 request parser: the first byte chooses the header length mode (none, a length taken
/// from the next two bytes, or raw); the rest is the body.
pub fn v2_parse(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = crate::codec::v2::parse_request(rest, None);
        }
        1 if rest.len() >= 2 => {
            let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let _ = crate::codec::v2::parse_request(&rest[2..], Some(n));
        }
        _ => {
            let _ = crate::codec::v2::parse_bytes_elements(rest);
        }
    }
}

fn codec(toml: &str) -> ModelCodec {
    let spec = parse_spec(
        "fuzz",
        toml,
        Path::new("/fuzz/model.toml"),
        Path::new("/fuzz"),
    )
    .expect("fuzz model spec parses");
    ModelCodec::new(&spec, limits(), 4096).expect("fuzz codec builds")
}

/// /v1 JSON instances for a regressor, an image classifier and a two-input tensor model.
pub fn json_instances(data: &[u8]) {
    static CODECS: OnceLock<Vec<ModelCodec>> = OnceLock::new();
    let codecs = CODECS.get_or_init(|| {
        vec![
            codec("kind = \"regressor\"\n[[inputs]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [3]\n[[outputs]]\nname = \"y\"\ndatatype = \"FP32\"\ndims = [1]"),
            codec("kind = \"image-classifier\"\n[image]\nwidth = 8\nheight = 8\n[output]\nlabels = [\"a\", \"b\"]"),
            codec("kind = \"tensor\"\n[[inputs]]\nname = \"a\"\ndatatype = \"INT64\"\ndims = [-1]\npad_value = 0\n[[inputs]]\nname = \"b\"\ndatatype = \"BOOL\"\ndims = [2, 2]\n[[outputs]]\nname = \"o\"\ndatatype = \"FP32\"\ndims = [1]"),
        ]
    });
    // the /v1 request path parses instances straight from the bytes...
    let direct: Vec<Instance> = match serde_json::from_slice::<Vec<Instance>>(data) {
        Ok(v) => v,
        Err(_) => match serde_json::from_slice::<Instance>(data) {
            Ok(i) => vec![i],
            Err(_) => Vec::new(),
        },
    };
    // the fast numeric scanner must agree with serde wherever it answers
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(fast) = crate::codec::numeric_instances(text) {
            let slow = serde_json::from_str::<Vec<Instance>>(text);
            assert_eq!(
                Ok(&fast),
                slow.as_ref().map_err(|_| ()),
                "fast scanner disagrees"
            );
        }
    }
    // ...and must agree with parsing through a JSON value first
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        if let Ok(via_value) = Instance::from_value(&value) {
            if let Ok(d) = serde_json::from_slice::<Instance>(data) {
                assert_eq!(d, via_value, "instance parsers disagree");
            }
        }
    }
    for c in codecs {
        for i in direct.iter().take(16) {
            let _ = c.decode_instance(i);
        }
    }
}

/// Tokenisation with the bundled text classifier's tokenizer.json.
pub fn tokenize(data: &[u8]) {
    static CODEC: OnceLock<crate::codec::TextCodec> = OnceLock::new();
    let codec = CODEC.get_or_init(|| {
        let tokenizer =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/text-classifier/tokenizer.json");
        crate::codec::TextCodec::load(
            &TextSpec {
                tokenizer,
                max_length: 64,
                pad_id: Some(0),
            },
            4096,
        )
        .expect("bundled tokenizer loads")
    });
    let _ = codec.encode(&String::from_utf8_lossy(data));
}
