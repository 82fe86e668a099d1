//! Decoding user images (PNG, JPEG) into RGB8, with size limits and clear errors.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use crate::{ModelError, Result};

/// Largest accepted side, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Largest accepted area: 64 MP (2²⁶ pixels, e.g. 8192 × 8192).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// Reads and decodes the PNG or JPEG image at `path` into RGB8 (see [`decode_image`]).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    decode_image(&bytes).map_err(|e| match e {
        ModelError::InvalidInput(msg) => ModelError::invalid(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// Decodes a PNG or JPEG image from memory into RGB8.
///
/// The format is detected from the content. The EXIF orientation is applied (as diffusers' `load_image` does with
/// `exif_transpose`); grayscale is expanded to RGB; transparency is composited onto white (as transformers'
/// `convert_to_rgb` does); 16-bit samples are scaled to 8 bits. Images larger than [`MAX_IMAGE_SIDE`] on a side or
/// [`MAX_IMAGE_PIXELS`] in area are refused before their pixels are decoded.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>> {
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ModelError::invalid(format!("cannot read the image: {e}")))?;
        match reader.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg) => Ok(reader),
            Some(other) => {
                Err(ModelError::invalid(format!("{other:?} images are not supported; use PNG or JPEG")))
            }
            None => Err(ModelError::invalid("not a PNG or JPEG image (unrecognized content)")),
        }
    };
    let (width, height) =
        reader()?.into_dimensions().map_err(|e| ModelError::invalid(format!("corrupt image header: {e}")))?;
    check_size(width, height)?;

    let mut reader = reader()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    // Room for the decoded image at up to 16 bits × 4 channels, plus the decoder's own buffers.
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let mut decoder =
        reader.into_decoder().map_err(|e| ModelError::invalid(format!("cannot decode the image: {e}")))?;
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| ModelError::invalid(format!("cannot decode the image: {e}")))?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(to_rgb(image))
}

fn check_size(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(ModelError::invalid(format!("the image is empty ({width}×{height})")));
    }
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE || width as u64 * height as u64 > MAX_IMAGE_PIXELS {
        return Err(ModelError::invalid(format!(
            "the image is {width}×{height} pixels; at most {MAX_IMAGE_SIDE} pixels a side and {} MP are accepted \
             (downscale it first)",
            MAX_IMAGE_PIXELS >> 20
        )));
    }
    Ok(())
}

/// RGB8 with transparency composited onto white.
fn to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let data = rgba
        .pixels()
        .flat_map(|p| {
            let [r, g, b, a] = p.0;
            let a = a as u32;
            let blend = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
            [blend(r), blend(g), blend(b)]
        })
        .collect();
    RgbImage::from_raw(w, h, data).expect("3 bytes per pixel")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_and_flattens_alpha_onto_white() {
        let mut rgba = image::RgbaImage::new(3, 2);
        rgba.put_pixel(0, 0, image::Rgba([10, 20, 30, 255]));
        rgba.put_pixel(1, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(2, 0, image::Rgba([0, 0, 0, 128]));
        let out = decode_image(&png(&DynamicImage::ImageRgba8(rgba))).unwrap();
        assert_eq!(out.dimensions(), (3, 2));
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(2, 0).0, [127, 127, 127]);
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 4, image::Luma([77])));
        assert!(decode_image(&png(&gray)).unwrap().pixels().all(|p| p.0 == [77, 77, 77]));
    }

    #[test]
    fn garbage_and_unsupported_formats_are_clear_errors() {
        let err = decode_image(b"definitely not an image").unwrap_err().to_string();
        assert!(err.contains("not a PNG or JPEG"), "{err}");
        let err = decode_image(b"GIF89a\x01\x00\x01\x00").unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
        // A valid PNG signature with a truncated body.
        let mut bytes = png(&DynamicImage::ImageRgb8(RgbImage::new(8, 8)));
        bytes.truncate(40);
        assert!(decode_image(&bytes).is_err());
    }

    #[test]
    fn oversized_images_are_refused_from_the_header() {
        assert!(check_size(16384, 4096).is_ok());
        assert!(check_size(16385, 10).unwrap_err().to_string().contains("at most 16384"));
        assert!(check_size(9000, 9000).unwrap_err().to_string().contains("64 MP"));
        // A PNG claiming 20000 × 20000 (IHDR, an empty IDAT, IEND) is refused before any pixel is decoded.
        let mut ihdr = 20000u32.to_be_bytes().to_vec();
        ihdr.extend(20000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &[]), (b"IEND", &[])] {
            bytes.extend((data.len() as u32).to_be_bytes());
            let body = [kind, data].concat();
            bytes.extend(&body);
            bytes.extend(crc32(&body).to_be_bytes());
        }
        let err = decode_image(&bytes).unwrap_err().to_string();
        assert!(err.contains("20000×20000"), "{err}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
