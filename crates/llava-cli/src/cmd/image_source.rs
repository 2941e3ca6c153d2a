//! Where `--image` and chat's `/image` take an image from: a file, or an `http(s)://` URL, as
//! the original LLaVA's `--image-file` does.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llava_data::image::{ImageProcessor, ProcessedImage};
use llava_model::image_inputs::ImageInputs;
use llava_model::pipeline::Pipeline;

/// A download is cut off past this size, before it can fill memory: no photo is this large.
const MAX_IMAGE_BYTES: u64 = 256 << 20;
/// For the whole request, body included.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    File(PathBuf),
    Url(String),
}

impl ImageSource {
    /// clap's value parser: a string that starts with `http://` or `https://` is a URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an image path cannot be empty".into());
        }
        let scheme = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        Ok(
            if scheme.starts_with("http://") || scheme.starts_with("https://") {
                Self::Url(s.to_string())
            } else {
                Self::File(PathBuf::from(s))
            },
        )
    }

    /// A file must exist and be a regular file. Checked before the model loads, so that a typo
    /// costs no load time; a URL is only known good once fetched.
    pub fn check(&self) -> Result<()> {
        let Self::File(path) = self else {
            return Ok(());
        };
        if !path.is_file() {
            let what = if path.is_dir() {
                "is a directory, not an image file"
            } else if path.exists() {
                "is not a regular file"
            } else {
                "no such file"
            };
            bail!("--image {}: {what}", path.display());
        }
        Ok(())
    }

    /// Reads (or downloads) the image and preprocesses it for the checkpoint's vision tower.
    pub fn process(&self, processor: &ImageProcessor) -> Result<ProcessedImage> {
        Ok(match self {
            Self::File(path) => processor.process_path(path)?,
            Self::Url(url) => processor.process_bytes(&fetch(url)?, url)?,
        })
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url(url) => f.write_str(url),
        }
    }
}

/// The preprocessed `images`, in order; `None` for no image.
pub fn pixel_values(pipeline: &Pipeline, images: &[ImageSource]) -> Result<Option<ImageInputs>> {
    let processed = images
        .iter()
        .map(|image| image.process(&pipeline.image_processor))
        .collect::<Result<Vec<_>>>()?;
    Ok(pipeline.image_inputs(&processed)?)
}

fn fetch(url: &str) -> Result<Vec<u8>> {
    let client = reqwest::blocking::Client::builder()
        .timeout(DOWNLOAD_TIMEOUT)
        .build()
        .context("cannot start an HTTP client")?;
    let response = client
        .get(url)
        .send()
        .with_context(|| format!("cannot download {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("cannot download {url}: the server answered {status}");
    }
    let too_large = || {
        anyhow::anyhow!(
            "{url}: larger than {} MiB, which is too large for an image",
            MAX_IMAGE_BYTES >> 20
        )
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_IMAGE_BYTES)
    {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    response
        .take(MAX_IMAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot download {url}"))?;
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert_eq!(
            ImageSource::parse("https://example.com/a.jpg"),
            Ok(ImageSource::Url("https://example.com/a.jpg".into()))
        );
        assert_eq!(
            ImageSource::parse("HTTP://example.com/a.jpg"),
            Ok(ImageSource::Url("HTTP://example.com/a.jpg".into()))
        );
        assert_eq!(
            ImageSource::parse("http.jpg"),
            Ok(ImageSource::File("http.jpg".into()))
        );
        assert_eq!(
            ImageSource::parse("images/http://x.png"),
            Ok(ImageSource::File("images/http://x.png".into()))
        );
        assert!(ImageSource::parse("").is_err());
    }
}
