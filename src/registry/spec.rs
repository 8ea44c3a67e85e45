//! A model's spec as the server uses it: model.toml's shared settings parsed by config, then
//! the kind step (the kind's own tables read by its code in [`crate::codec::kinds`]). Every
//! reader of a model.toml goes through here.

use std::path::Path;

use crate::codec::kinds;
use crate::config::model_spec::{ModelSpec, SpecError};

/// Reads `config` (a model.toml) and completes it with what its kind decides; relative files
/// resolve against `files_dir`.
pub fn load_spec(name: &str, config: &Path, files_dir: &Path) -> Result<ModelSpec, SpecError> {
    complete(ModelSpec::load(name, config, files_dir)?, config)
}

/// [`load_spec`] of a model.toml's text found at `config`.
pub fn parse_spec(
    name: &str,
    text: &str,
    config: &Path,
    files_dir: &Path,
) -> Result<ModelSpec, SpecError> {
    complete(ModelSpec::parse(name, text, config, files_dir)?, config)
}

fn complete(mut spec: ModelSpec, config: &Path) -> Result<ModelSpec, SpecError> {
    kinds::complete(&mut spec).map_err(|message| SpecError::Invalid {
        path: config.to_path_buf(),
        message,
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::*;
    use crate::codec::image::{Crop, ImageSpec, Interpolation, Resize};
    use crate::config::model_spec::{DeviceSpec, Placement, Precision};
    use crate::tensor::DType;

    fn parse(text: &str) -> Result<ModelSpec, SpecError> {
        parse_spec(
            "m",
            text,
            Path::new("/repo/m/model.toml"),
            Path::new("/repo/m"),
        )
    }

    #[test]
    fn image_classifier_defaults() {
        let s = parse(
            r#"kind = "image-classifier"
               [image]
               width = 64
               height = 32
               [output]
               labels = ["a", "b"]"#,
        )
        .unwrap();
        assert_eq!(s.file, PathBuf::from("/repo/m/model.pt"));
        assert_eq!(s.inputs[0].dims, vec![3, 32, 64]);
        assert_eq!(s.outputs[0].dims, vec![2]);
        assert_eq!(s.batching.max_batch_size, 32);
        assert_eq!(s.device, Placement::one(DeviceSpec::Auto));
        assert_eq!(s.precision, Precision::Fp32);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = parse("kind = \"image-classifier\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/repo/m/model.toml"), "{e}");
        assert!(e.contains("[image]"), "{e}");
        let e = parse("kind = \"nonsense\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant"), "{e}");
        let e = parse("kind = \"regressor\"\nunknown_key = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown_key"), "{e}");
        let e = parse("kind = \"regressor\"\n[batching]\nmax_batch_size = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_batch_size"), "{e}");
    }

    #[test]
    fn text_kinds_take_token_inputs_by_name() {
        let text = "[text]\nmax_length = 16\n";
        let emb = |extra: &str| {
            parse(&format!(
                "kind = \"text-embedding\"\n{extra}\n{text}\n[[outputs]]\nname = \"h\"\ndatatype = \"FP32\"\ndims = [-1, 8]\n[embedding]\npooling = \"mean\""
            ))
        };
        let s = emb("").unwrap();
        let names: Vec<&str> = s.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask"]);
        assert_eq!(s.tables["embedding"]["pooling"].as_str(), Some("mean"));
        let e = emb("[[inputs]]\nname = \"pixels\"\ndatatype = \"INT64\"\ndims = [-1]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("input_ids"), "{e}");
        // pooling none takes a vector, not token states
        let e = parse(&format!(
            "kind = \"text-embedding\"\n{text}\n[[outputs]]\nname = \"h\"\ndatatype = \"FP32\"\ndims = [-1, 8]"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("[hidden]"), "{e}");
        let e = parse(&format!("kind = \"text-embedding\"\n{text}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[[outputs]]"), "{e}");
        // a reranker gets a one-logit output; [embedding] is not for it
        let s = parse(&format!("kind = \"reranker\"\n{text}")).unwrap();
        assert_eq!(s.outputs[0].dims, vec![1]);
        assert!(parse(&format!(
            "kind = \"reranker\"\n{text}\n[embedding]\nnormalize = true"
        ))
        .is_err());
        // a classifier needs labels from somewhere
        let e = parse(&format!("kind = \"text-classifier\"\n{text}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("id2label"), "{e}");
    }

    #[test]
    fn undeclared_token_inputs_are_read_from_the_torchscript_forward() {
        use crate::config::torchscript::tests::archive;
        let forward = |args: &str| {
            format!("class M(Module):\n  def forward(self: __torch__.M,\n    {args}) -> Tensor:\n    pass\n")
        };
        let spec_for = |args: &str| {
            let file = archive("__torch__", "M", &forward(args));
            let parsed = parse(&format!(
                "kind = \"reranker\"\nfile = \"{}\"\n[text]\nmax_length = 16\n",
                file.display()
            ));
            std::fs::remove_file(&file).unwrap();
            parsed
        };
        let names =
            |s: &ModelSpec| -> Vec<String> { s.inputs.iter().map(|i| i.name.clone()).collect() };
        // the forward's order, whatever it is
        let s =
            spec_for("token_type_ids: Tensor,\n    input_ids: Tensor,\n    attention_mask: Tensor")
                .unwrap();
        assert_eq!(names(&s), ["token_type_ids", "input_ids", "attention_mask"]);
        // an argument with a default may be left to the model
        let s = spec_for("input_ids: Tensor,\n    position_ids: Optional[Tensor]=None").unwrap();
        assert_eq!(names(&s), ["input_ids"]);
        // names that say nothing (tch's traces): the kind's default
        let s = spec_for("argument_1: Tensor").unwrap();
        assert_eq!(names(&s), ["input_ids", "attention_mask"]);
        // an argument the tokenizer cannot fill, or none it can: refused, saying why
        let e = spec_for("input_ids: Tensor,\n    pixel_values: Tensor")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'pixel_values' is not one of"), "{e}");
        let e = spec_for("x: Tensor").unwrap_err().to_string();
        assert!(e.contains("forward takes none of"), "{e}");
    }

    #[test]
    fn labels_come_from_id2label_in_config_json() {
        let dir = std::env::temp_dir().join(format!("aiaas-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"id2label": {"1": "yes", "0": "no"}}"#,
        )
        .unwrap();
        let toml = "kind = \"text-classifier\"\n[text]\nmax_length = 8";
        let s = parse_spec("m", toml, &dir.join("model.toml"), &dir).unwrap();
        assert_eq!(s.labels, ["no", "yes"]);
        std::fs::write(
            dir.join("config.json"),
            r#"{"id2label": {"0": "a", "2": "c"}}"#,
        )
        .unwrap();
        assert!(parse_spec("m", toml, &dir.join("model.toml"), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_resize_modes_are_checked() {
        let img = |extra: &str| {
            parse(&format!(
                "kind = \"image-classifier\"\n[image]\nwidth = 224\nheight = 224\n{extra}\n[output]\nlabels = [\"a\"]"
            ))
        };
        let s = img("resize = \"shorter-side\"\nresize_to = 256\ncrop = \"center\"\ninterpolation = \"bicubic\"").unwrap();
        let i = ImageSpec::deserialize(s.tables["image"].clone()).unwrap();
        assert_eq!(
            (i.resize, i.crop, i.resize_to),
            (Resize::ShorterSide, Crop::Center, Some(256))
        );
        assert_eq!(i.interpolation, Interpolation::Bicubic);
        assert!(img("crop = \"center\"").is_err());
        assert!(img("resize = \"shorter-side\"").is_err());
        assert!(img("resize = \"shorter-side\"\nresize_to = 100\ncrop = \"center\"").is_err());
        assert!(img("interpolation = \"lanczos\"").is_err());
    }

    #[test]
    fn tensor_kind_needs_a_signature() {
        assert!(parse("kind = \"tensor\"").is_err());
        let s = parse(
            r#"kind = "tensor"
               [[inputs]]
               name = "a"
               datatype = "INT32"
               dims = [-1]
               pad_value = 0
               [[outputs]]
               name = "b"
               datatype = "FP64"
               dims = [2]"#,
        )
        .unwrap();
        assert_eq!(s.inputs[0].datatype, DType::Int32);
        assert_eq!(s.inputs[0].pad_value, Some(0.0));
    }

    #[test]
    fn text_generation_is_one_line_and_wrong_settings_are_named() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        parse("kind = \"text-generation\"").unwrap();
        let kind = "kind = \"text-generation\"\n";
        assert!(err(&format!("{kind}instances = 2")).contains("instances = 2"));
        assert!(err(&format!("{kind}[generation]\nmax_sequences = 0")).contains("max_sequences"));
        assert!(err(&format!("{kind}[image]\nsize = 3")).contains("image"));
        assert!(err(&format!(
            "{kind}[[inputs]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [1]"
        ))
        .contains("declares no tensors"));
    }
}
