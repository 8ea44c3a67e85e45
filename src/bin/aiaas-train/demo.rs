//! Generated data for the demo image model: circles, squares and triangles on noisy backgrounds.
//!
//! Used by the trainer (training and held-out sets), and included by path into the tests
//! (`tests/common`: fresh shapes to classify) and the benchmark (PNG bodies to post). Plain
//! image code: no model, no HTTP, not part of the server library.

use image::{Rgb, RgbImage};
use rand::Rng;

/// The demo image classes, in label order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn label(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

fn colour(rng: &mut impl Rng) -> [f32; 3] {
    [
        rng.random_range(0.0..255.0),
        rng.random_range(0.0..255.0),
        rng.random_range(0.0..255.0),
    ]
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt()
}

/// A `size` x `size` image of `shape`: random size, position, rotation, colours and noise.
pub fn draw(shape: Shape, size: u32, rng: &mut impl Rng) -> RgbImage {
    let s = size as f32;
    let bg = colour(rng);
    let mut fg = colour(rng);
    while distance(bg, fg) < 120.0 {
        fg = colour(rng);
    }
    let radius = rng.random_range(0.18 * s..0.42 * s); // half the extent of the shape
    let cx = rng.random_range(radius + 1.0..s - radius - 1.0);
    let cy = rng.random_range(radius + 1.0..s - radius - 1.0);
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let noise = rng.random_range(0.0..20.0f32);
    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match shape {
            Shape::Circle => dx * dx + dy * dy <= radius * radius,
            Shape::Square => {
                // rotated square of half-side r/√2·1.2 so that it spans about the same area
                let h = radius * 0.85;
                let (c, s) = (angle.cos(), angle.sin());
                let (u, v) = (dx * c + dy * s, -dx * s + dy * c);
                u.abs() <= h && v.abs() <= h
            }
            Shape::Triangle => {
                let p: Vec<(f32, f32)> = (0..3)
                    .map(|k| {
                        let a = angle + k as f32 * std::f32::consts::TAU / 3.0;
                        (cx + radius * a.cos(), cy + radius * a.sin())
                    })
                    .collect();
                point_in_triangle((x, y), p[0], p[1], p[2])
            }
        }
    };
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let base = if inside(x as f32 + 0.5, y as f32 + 0.5) {
            fg
        } else {
            bg
        };
        let mut out = [0u8; 3];
        for c in 0..3 {
            let n = if noise > 0.0 {
                rng.random_range(-noise..noise)
            } else {
                0.0
            };
            out[c] = (base[c] + n).clamp(0.0, 255.0) as u8;
        }
        *px = Rgb(out);
    }
    img
}

fn point_in_triangle(p: (f32, f32), a: (f32, f32), b: (f32, f32), c: (f32, f32)) -> bool {
    let sign = |p1: (f32, f32), p2: (f32, f32), p3: (f32, f32)| {
        (p1.0 - p3.0) * (p2.1 - p3.1) - (p2.0 - p3.0) * (p1.1 - p3.1)
    };
    let d1 = sign(p, a, b);
    let d2 = sign(p, b, c);
    let d3 = sign(p, c, a);
    let neg = d1 < 0.0 || d2 < 0.0 || d3 < 0.0;
    let pos = d1 > 0.0 || d2 > 0.0 || d3 > 0.0;
    !(neg && pos)
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encoding to memory");
    out
}

/// JPEG bytes of an image at `quality` (1-100).
pub fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .expect("JPEG encoding to memory");
    out
}
