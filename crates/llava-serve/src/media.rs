//! Where a request's images come from: `data:` URLs always; files only under
//! `--allowed-local-media-path`; `http(s)` only with `--allow-remote-images` ([`crate::remote`]).
//! Every image's size is read from its header and capped before it is decoded, so a small
//! file that claims gigapixels (a decompression bomb) costs nothing.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::Engine;
use image::ImageReader;
use llava_data::image::{ImageProcessor, ProcessedImage};

use crate::config::MediaPolicy;
use crate::error::ApiError;
use crate::remote;
use crate::validate::ImageRef;

/// Fetches, checks and preprocesses one image for the vision tower.
pub async fn load(
    image: &ImageRef,
    policy: &MediaPolicy,
    max_pixels: u64,
    processor: &ImageProcessor,
) -> Result<ProcessedImage, ApiError> {
    let bytes = read(image, policy).await?;
    let processor = processor.clone();
    let param = image.param.clone();
    // Decoding and resizing are CPU work: off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        check_pixels(&bytes, max_pixels).map_err(|e| e.with_param(param.clone()))?;
        processor
            .process_bytes(&bytes, "the image")
            .map_err(|e| ApiError::invalid_param(param, e.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal(format!("image decoding stopped: {e}")))?
}

/// The image's bytes, from wherever the policy allows.
pub async fn read(image: &ImageRef, policy: &MediaPolicy) -> Result<Vec<u8>, ApiError> {
    let url = image.url.trim();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let result = if lower.starts_with("data:") {
        data_url(url, policy.max_image_bytes)
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        if !policy.allow_remote_images {
            Err(ApiError::invalid(
                "remote images are not fetched by this server (start it with --allow-remote-images); send the image as a data: URL",
            ))
        } else {
            remote::fetch(url, policy).await
        }
    } else if lower.starts_with("file://") {
        match reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
        {
            Some(path) => local(&path, policy).await,
            None => Err(ApiError::invalid(format!(
                "`{url}` is not a valid file:// URL"
            ))),
        }
    } else if url.contains("://") {
        Err(ApiError::invalid(
            "image URLs must be data:, http(s):// or file:// URLs",
        ))
    } else {
        local(Path::new(url), policy).await
    };
    result.map_err(|e| e.with_param(image.param.clone()))
}

/// `data:[image/...][;charset=...];base64,DATA`.
fn data_url(url: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let Some((head, data)) = url.split_once(',') else {
        return Err(ApiError::invalid(
            "a data: URL needs a comma before its data",
        ));
    };
    let media = head[5..].split(';').next().unwrap_or_default();
    if !head.ends_with(";base64") {
        return Err(ApiError::invalid(
            "image data: URLs must be base64 (`;base64,`)",
        ));
    }
    if !(media.is_empty() || media.to_ascii_lowercase().starts_with("image/")) {
        return Err(ApiError::invalid(format!(
            "a data: URL of type `{media}` is not an image"
        )));
    }
    // Base64 takes 4 characters per 3 bytes: refuse before decoding what would be too large.
    if data.len() / 4 * 3 > max_bytes + 3 {
        return Err(too_many_bytes(max_bytes));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::invalid(format!("the data: URL is not valid base64: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(too_many_bytes(max_bytes));
    }
    Ok(bytes)
}

pub fn too_many_bytes(max_bytes: usize) -> ApiError {
    ApiError::invalid(format!(
        "the image is larger than this server's limit of {max_bytes} bytes"
    ))
}

/// A file under the allowed folder, once `..` and symlinks are resolved. A relative path is
/// taken from that folder.
async fn local(path: &Path, policy: &MediaPolicy) -> Result<Vec<u8>, ApiError> {
    let Some(root) = &policy.allowed_local_media_path else {
        return Err(ApiError::invalid(
            "local files are not read by this server (start it with --allowed-local-media-path DIR); send the image as a data: URL",
        ));
    };
    let refused = || {
        ApiError::invalid(format!(
            "{} is not a file under the folder this server may read images from",
            path.display()
        ))
    };
    let root = tokio::fs::canonicalize(root)
        .await
        .map_err(|_| ApiError::internal("the allowed media folder cannot be opened"))?;
    let candidate: PathBuf = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    // The same message for a file that is missing and one that is outside: a client learns
    // nothing about what lies beyond the folder.
    let real = tokio::fs::canonicalize(&candidate)
        .await
        .map_err(|_| refused())?;
    if !real.starts_with(&root) {
        return Err(refused());
    }
    let meta = tokio::fs::metadata(&real).await.map_err(|_| refused())?;
    if !meta.is_file() {
        return Err(refused());
    }
    if meta.len() > policy.max_image_bytes as u64 {
        return Err(too_many_bytes(policy.max_image_bytes));
    }
    tokio::fs::read(&real).await.map_err(|_| refused())
}

/// Refuses an image whose header claims more than `max_pixels`, without decoding it.
pub fn check_pixels(bytes: &[u8], max_pixels: u64) -> Result<(), ApiError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(format!("cannot read the image: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::invalid(
            "not a recognised image format (expected png, jpeg, gif, webp or bmp)",
        ));
    }
    // Only the header is read: the decoder's allocation limits, which would refuse the bomb
    // with a vaguer message, have nothing to guard yet.
    reader.no_limits();
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::invalid(format!("cannot read the image header: {e}")))?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(ApiError::invalid(format!(
            "the image is {w}x{h} pixels, more than this server's limit of {max_pixels}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_image_passes_the_pixel_cap_and_text_does_not() {
        let png = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models/images/small_24x20.png"),
        )
        .expect("fixture");
        assert!(check_pixels(&png, 24 * 20).is_ok());
        assert!(check_pixels(&png, 24 * 20 - 1).is_err());
        assert!(check_pixels(b"not an image", 10).is_err());
    }

    #[test]
    fn data_urls_need_base64_images() {
        assert_eq!(
            data_url("data:image/png;base64,AAEC", 10).expect("ok"),
            [0, 1, 2]
        );
        assert!(data_url("data:image/png,AAEC", 10).is_err());
        assert!(data_url("data:text/plain;base64,AAEC", 10).is_err());
        assert!(data_url("data:image/png;base64,AAECAwQF", 3).is_err());
        assert!(data_url("data:image/png;base64,!!!", 10).is_err());
    }
}
