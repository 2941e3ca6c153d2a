//! What every chart the project draws shares: the embedded font and the PNG writer. `loss.png`
//! (llava-train) and `llava instruct stats --plot` draw with plotters into an RGB buffer; the
//! text is set in DejaVu Sans, embedded in the binary (the `dejavu` crate) and rasterised by
//! plotters' `ab_glyph` backend, so no system fonts or libraries are needed.

use std::path::Path;
use std::sync::OnceLock;

use image::ImageEncoder;
use plotters::style::{FontStyle, register_font};

/// Registers the embedded font with plotters as `sans-serif`, once per process.
pub fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded DejaVu Sans font does not load".into())
    }
}

/// Writes an RGB `buffer` of `width × height` to `path` as a PNG, atomically (a temporary file
/// renamed), at the best compression: a mostly white chart is about a third of the default's
/// size.
pub fn write_png(path: &Path, buffer: &[u8], width: u32, height: u32) -> Result<(), String> {
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    image::codecs::png::PngEncoder::new_with_quality(
        std::io::BufWriter::new(file),
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(buffer, width, height, image::ExtendedColorType::Rgb8)
    .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_font_loads_and_a_buffer_becomes_a_png() {
        ensure_font().expect("font");
        let dir = std::env::temp_dir().join(format!("llava-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("t.png");
        let mut buffer = vec![255u8; 4 * 3 * 3];
        buffer[0] = 0;
        write_png(&path, &buffer, 4, 3).expect("png");
        let img = image::open(&path).expect("decodes").to_rgb8();
        assert_eq!(img.dimensions(), (4, 3));
        assert_eq!(img.get_pixel(0, 0).0, [0, 255, 255]);
        assert!(!path.with_extension("png.tmp").exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
