//! Images: encoded bytes or pixel arrays to a normalised CHW float tensor.

use std::io::Cursor;

use serde::Deserialize;

use super::budget::{decode_share, BudgetShare, DecodeBudget};
use super::CodecError;
use crate::tensor::{DType, HostTensor};
use base64::Engine as _;
use image::{imageops::FilterType, DynamicImage, ImageReader};

/// Image pre-processing: decoded images are converted to RGB (or grey), resized to
/// `width` x `height` (stretched, or the shorter side scaled to `resize_to` and the centre
/// cropped, as torchvision's `Resize` + `CenterCrop`), then each channel becomes
/// `(pixel * scale - mean) / std`, laid out CHW.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub width: u32,
    pub height: u32,
    #[serde(default = "default_channels")]
    pub channels: usize,
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    #[serde(default)]
    pub resize: Resize,
    /// With `resize = "shorter-side"`: the shorter side's length after resizing (default: the
    /// larger of `width` and `height`).
    #[serde(default)]
    pub resize_to: Option<u32>,
    #[serde(default)]
    pub crop: Crop,
    #[serde(default)]
    pub interpolation: Interpolation,
}

/// How a decoded image reaches the model's input size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resize {
    /// Straight to `width` x `height`, aspect ratio not kept.
    #[default]
    Stretch,
    /// The shorter side to `resize_to`, aspect ratio kept (torchvision's `Resize(n)`).
    ShorterSide,
}

/// What is cut from the resized image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Crop {
    #[default]
    None,
    /// The centre `width` x `height` (torchvision's `CenterCrop`).
    Center,
}

/// The resampling filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    #[default]
    Bilinear,
    Nearest,
    Bicubic,
}

fn default_channels() -> usize {
    3
}
fn default_scale() -> f32 {
    1.0 / 255.0
}

impl ImageSpec {
    pub fn mean(&self) -> Vec<f32> {
        self.mean
            .clone()
            .unwrap_or_else(|| vec![0.0; self.channels])
    }
    pub fn std(&self) -> Vec<f32> {
        self.std.clone().unwrap_or_else(|| vec![1.0; self.channels])
    }
}

/// Bounds on images accepted for decoding, checked from the header before any pixel is decoded.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Most pixels (width x height) of one image.
    pub max_pixels: u64,
    /// Bytes the decoder may allocate.
    pub max_alloc: u64,
    /// Decoded bytes in flight across the server (`None`: unbounded).
    pub budget: Option<&'static DecodeBudget>,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_width: 8192,
            max_height: 8192,
            max_pixels: 40_000_000,
            max_alloc: 512 << 20,
            budget: None,
        }
    }
}

/// Decodes and pre-processes images for one model.
#[derive(Debug, Clone)]
pub struct ImageCodec {
    spec: ImageSpec,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Each channel's 256 byte values, normalised, as little-endian f32 bytes.
    lut: Vec<[u8; 4]>,
    limits: ImageLimits,
}

impl ImageCodec {
    pub fn new(spec: ImageSpec, limits: ImageLimits) -> Self {
        let (mean, std) = (spec.mean(), spec.std());
        let lut = (0..spec.channels)
            .flat_map(|ch| {
                let (scale, m, s) = (spec.scale, mean[ch], std[ch]);
                (0..=255u8).map(move |p| ((p as f32 * scale - m) / s).to_le_bytes())
            })
            .collect();
        Self {
            mean,
            std,
            lut,
            spec,
            limits,
        }
    }

    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    /// An encoded image (PNG or JPEG) to a `[1, C, H, W]` tensor.
    pub fn decode(&self, bytes: &[u8]) -> Result<HostTensor, CodecError> {
        let (img, _share) = self.decode_image(bytes)?;
        Ok(self.preprocess(img))
    }

    /// Base64 of an encoded image (standard or URL-safe alphabet, padding optional).
    pub fn decode_base64(&self, b64: &str) -> Result<HostTensor, CodecError> {
        let b64 = b64.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
            .or_else(|_| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('='))
            })
            .map_err(|e| CodecError::Malformed(format!("\"b64\" is not valid base64: {e}")))?;
        self.decode(&bytes)
    }

    /// The decoded image and its share of the decode budget, held until it is pre-processed.
    fn decode_image(
        &self,
        bytes: &[u8],
    ) -> Result<(DynamicImage, Option<BudgetShare<'static>>), CodecError> {
        let undecodable =
            |e: &dyn std::fmt::Display| CodecError::Malformed(format!("cannot decode image: {e}"));
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| undecodable(&e))?;
        if reader.format().is_none() {
            return Err(CodecError::Malformed(
                "cannot decode image: unknown format (PNG and JPEG are accepted)".into(),
            ));
        }
        if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
            // the decoder would fill the missing part with grey and answer a confident label
            return Err(CodecError::Malformed(
                "cannot decode image: the JPEG is truncated (no end-of-image marker after its last scan)".into(),
            ));
        }
        let l = self.limits;
        // dimensions are checked below with a plainer message than the decoder's
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(l.max_alloc);
        let mut reader = reader;
        reader.limits(limits);
        let too_large = |e: image::ImageError| match e {
            image::ImageError::Limits(e) => CodecError::TooLarge(format!("image too large: {e}")),
            e => undecodable(&e),
        };
        // the header is read once; its dimensions are checked before any pixel is decoded
        let decoder = reader.into_decoder().map_err(too_large)?;
        let (w, h) = image::ImageDecoder::dimensions(&decoder);
        if w > l.max_width || h > l.max_height {
            return Err(CodecError::TooLarge(format!(
                "image is {w}x{h} pixels; at most {}x{} is accepted",
                l.max_width, l.max_height
            )));
        }
        if w as u64 * h as u64 > l.max_pixels {
            return Err(CodecError::TooLarge(format!(
                "image is {w}x{h} = {} pixels; at most {} are accepted (--max-image-pixels)",
                w as u64 * h as u64,
                l.max_pixels
            )));
        }
        // the decoded pixels and one converted copy are in memory at once
        let cost = image::ImageDecoder::total_bytes(&decoder).saturating_mul(2);
        let share = decode_share(l.budget, cost)?;
        Ok((
            DynamicImage::from_decoder(decoder).map_err(too_large)?,
            share,
        ))
    }

    fn preprocess(&self, img: DynamicImage) -> HostTensor {
        let c = self.spec.channels;
        // into_*: no copy when the decoder already produced that pixel format
        let pixels: Vec<u8> = if c == 1 {
            self.fit(img.into_luma8()).into_raw()
        } else {
            self.fit(img.into_rgb8()).into_raw()
        };
        self.normalise_hwc(&pixels)
    }

    /// The image at the model's `width` x `height`: stretched, or its shorter side scaled to
    /// `resize_to` and the centre cut out (torchvision's `Resize(n)` + `CenterCrop`).
    fn fit<P: image::Pixel + 'static>(
        &self,
        img: image::ImageBuffer<P, Vec<P::Subpixel>>,
    ) -> image::ImageBuffer<P, Vec<P::Subpixel>>
    where
        P::Subpixel: 'static,
    {
        let (w, h) = (self.spec.width, self.spec.height);
        let filter = match self.spec.interpolation {
            Interpolation::Bilinear => FilterType::Triangle,
            Interpolation::Nearest => FilterType::Nearest,
            Interpolation::Bicubic => FilterType::CatmullRom,
        };
        if self.spec.resize == Resize::Stretch {
            return resize_if_needed(img, w, h, filter);
        }
        let to = self.spec.resize_to.unwrap_or(w.max(h));
        let (rw, rh) = shorter_side(img.width(), img.height(), to);
        let resized = resize_if_needed(img, rw, rh, filter);
        let (x, y) = centre_offset(rw, w, rh, h);
        image::imageops::crop_imm(&resized, x, y, w, h).to_image()
    }

    /// Pixel values 0..255 shaped `[H][W][C]` (or flat, HWC order), as parsed from JSON.
    pub fn decode_pixels(&self, values: &[f64], shape: &[usize]) -> Result<HostTensor, CodecError> {
        let (w, h, c) = (
            self.spec.width as usize,
            self.spec.height as usize,
            self.spec.channels,
        );
        let ok = shape == [h, w, c] || shape == [h * w * c] || (c == 1 && shape == [h, w]);
        if !ok || values.len() != h * w * c {
            return Err(CodecError::Invalid(format!(
                "an image instance is {{\"b64\": \"<base64 PNG or JPEG>\"}} or pixel values shaped [{h}][{w}][{c}] (or flat, {} numbers); got shape {shape:?}",
                h * w * c
            )));
        }
        if let Some(bad) = values.iter().find(|v| !(0.0..=255.0).contains(*v)) {
            return Err(CodecError::Invalid(format!(
                "pixel values are 0..255, got {bad}"
            )));
        }
        // one pass, HWC numbers straight to little-endian f32 bytes in CHW order
        let plane = w * h;
        let mut out = vec![0u8; plane * c * 4];
        for (ch, dst) in out.chunks_exact_mut(plane * 4).enumerate() {
            let (scale, mean, std) = (self.spec.scale, self.mean[ch], self.std[ch]);
            let lut = &self.lut[ch * 256..(ch + 1) * 256];
            for (d, &v) in dst
                .chunks_exact_mut(4)
                .zip(values.iter().skip(ch).step_by(c))
            {
                // whole numbers (the usual case) from the table the PNG path uses
                let byte = v as u8;
                if byte as f64 == v {
                    d.copy_from_slice(&lut[byte as usize]);
                } else {
                    d.copy_from_slice(&((v as f32 * scale - mean) / std).to_le_bytes());
                }
            }
        }
        Ok(HostTensor::new(DType::Fp32, vec![1, c, h, w], out).expect("CHW shape"))
    }

    fn normalise_hwc(&self, hwc: &[u8]) -> HostTensor {
        // one table lookup per byte, written straight as little-endian f32 in CHW order
        let c = self.spec.channels;
        let table = &self.lut;
        let (w, h) = (self.spec.width as usize, self.spec.height as usize);
        let plane = w * h;
        let mut out = vec![0u8; plane * c * 4];
        for (ch, dst) in out.chunks_exact_mut(plane * 4).enumerate() {
            let lut = &table[ch * 256..(ch + 1) * 256];
            for (d, px) in dst.chunks_exact_mut(4).zip(hwc.iter().skip(ch).step_by(c)) {
                d.copy_from_slice(&lut[*px as usize]);
            }
        }
        HostTensor::new(DType::Fp32, vec![1, c, h, w], out).expect("CHW shape")
    }
}

fn resize_if_needed<P: image::Pixel + 'static>(
    img: image::ImageBuffer<P, Vec<P::Subpixel>>,
    w: u32,
    h: u32,
    filter: FilterType,
) -> image::ImageBuffer<P, Vec<P::Subpixel>>
where
    P::Subpixel: 'static,
{
    if img.width() == w && img.height() == h {
        img
    } else {
        image::imageops::resize(&img, w, h, filter)
    }
}

/// The size with the shorter side scaled to `to` and the longer one in proportion, rounded
/// down (torchvision's `Resize(int)`).
fn shorter_side(w: u32, h: u32, to: u32) -> (u32, u32) {
    let long = |long: u32, short: u32| ((to as u64 * long as u64) / short.max(1) as u64) as u32;
    if w <= h {
        (to, long(h, w).max(1))
    } else {
        (long(w, h).max(1), to)
    }
}

/// Where the centre `w` x `h` of an `rw` x `rh` image starts: torchvision's `CenterCrop`, which
/// rounds half offsets to even (Python's `round`).
fn centre_offset(rw: u32, w: u32, rh: u32, h: u32) -> (u32, u32) {
    let half = |outer: u32, inner: u32| {
        ((outer.saturating_sub(inner)) as f64 / 2.0).round_ties_even() as u32
    };
    (half(rw, w), half(rh, h))
}

/// Whether a JPEG's last scan is followed by its end-of-image marker (FF D9). In entropy-coded
/// data every FF byte is followed by 00 or a restart marker, so an FF D9 after the last
/// start-of-scan (FF DA) can only be the real end; a truncated file has none.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> ImageCodec {
        ImageCodec::new(
            ImageSpec {
                width: 4,
                height: 2,
                channels: 3,
                scale: 1.0 / 255.0,
                mean: None,
                std: None,
                resize: Default::default(),
                resize_to: None,
                crop: Default::default(),
                interpolation: Default::default(),
            },
            ImageLimits::default(),
        )
    }

    #[test]
    fn shorter_side_and_centre_crop_follow_torchvision() {
        // Resize(256): the long side is int(256 * long / short)
        assert_eq!(shorter_side(320, 240, 256), (341, 256));
        assert_eq!(shorter_side(240, 320, 256), (256, 341));
        assert_eq!(shorter_side(500, 500, 256), (256, 256));
        // CenterCrop(224): offsets round half to even, as Python's round does
        assert_eq!(centre_offset(341, 224, 256, 224), (58, 16));
        assert_eq!(centre_offset(227, 224, 225, 224), (2, 0));
        assert_eq!(centre_offset(224, 224, 224, 224), (0, 0));
    }

    fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_truncated_jpeg_is_malformed_not_grey() {
        let img =
            image::RgbImage::from_fn(48, 48, |x, y| image::Rgb([x as u8 * 5, y as u8 * 5, 90]));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        assert!(codec().decode(&jpeg).is_ok());
        for cut in [jpeg.len() / 2, jpeg.len() - 2] {
            match codec().decode(&jpeg[..cut]) {
                Err(CodecError::Malformed(m)) => assert!(m.contains("truncated"), "{m}"),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // bytes after the end marker (as some cameras write) are fine
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert!(codec().decode(&padded).is_ok());
    }

    #[test]
    fn decodes_resizes_and_lays_out_chw() {
        let t = codec().decode(&png(8, 8, [255, 0, 51])).unwrap();
        assert_eq!(t.shape, vec![1, 3, 2, 4]);
        let v = t.to_f32_vec();
        assert!(v[..8].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(v[8..16].iter().all(|&x| x == 0.0));
        assert!(v[16..].iter().all(|&x| (x - 0.2).abs() < 1e-6));
    }

    #[test]
    fn pixel_arrays_match_decoded_images() {
        let c = codec();
        let from_png = c.decode(&png(4, 2, [10, 20, 30])).unwrap();
        let px = |v: serde_json::Value| {
            let g = crate::codec::instance::Grid::from_value(&v, 1000).unwrap();
            (g.values, g.shape)
        };
        let (values, shape) = px(serde_json::json!(vec![vec![vec![10, 20, 30]; 4]; 2]));
        assert_eq!(c.decode_pixels(&values, &shape).unwrap(), from_png);
        let (values, shape) = px(serde_json::json!([10, 20, 30].repeat(8)));
        assert_eq!(c.decode_pixels(&values, &shape).unwrap(), from_png);
        // fractional values are normalised too, not only whole ones
        let (values, shape) = px(serde_json::json!([127.5, 0.25, 255.0].repeat(8)));
        let v = c.decode_pixels(&values, &shape).unwrap().to_f32_vec();
        assert_eq!((v[0], v[8], v[16]), (127.5 / 255.0, 0.25 / 255.0, 1.0));
        let (values, shape) = px(serde_json::json!([1, 2, 3]));
        assert!(c.decode_pixels(&values, &shape).is_err());
        let (values, shape) = px(serde_json::json!(vec![300; 24]));
        assert!(c.decode_pixels(&values, &shape).is_err());
    }

    #[test]
    fn refuses_garbage_and_oversized_images() {
        let c = codec();
        assert!(matches!(
            c.decode(b"not an image"),
            Err(CodecError::Malformed(_))
        ));
        let mut small = codec();
        small.limits.max_width = 4;
        assert!(matches!(
            small.decode(&png(5, 1, [0, 0, 0])),
            Err(CodecError::TooLarge(m)) if m == "image is 5x1 pixels; at most 4x8192 is accepted"
        ));
        let truncated = &png(8, 8, [1, 2, 3])[..40];
        assert!(c.decode(truncated).is_err());
        let _ = &c;
    }
}
