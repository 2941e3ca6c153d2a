//! `preprocessor_config.json` of HF `CLIPImageProcessor`, in every shape found on the hub.

use std::path::Path;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ImageError;
use super::resample::ResampleFilter;

/// transformers' `OPENAI_CLIP_MEAN`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The largest side a resize or crop may ask for. Vision towers take a few hundred pixels; a
/// config asking for more than this is corrupt, and honouring it would try to allocate
/// gigabytes for a single image.
pub const MAX_SIDE: u32 = 16384;

/// The `size` field: how the resize target is derived from the input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeSize {
    /// `{"shortest_edge": n}` (or a bare int, as older CLIP configs write it): scale so the short
    /// side is `n`, the long side `int(n * long / short)`. With `longest_edge`, the long side is
    /// capped as transformers' `get_size_with_aspect_ratio` does.
    ShortestEdge {
        shortest_edge: u32,
        longest_edge: Option<u32>,
    },
    /// `{"height": h, "width": w}`: resize to exactly this, ignoring the aspect ratio.
    Exact { height: u32, width: u32 },
}

/// The `crop_size` field; a bare int means a square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

/// Mirror of HF `CLIPImageProcessor`'s `preprocessor_config.json`. Missing fields take CLIP's
/// defaults (224 px, bicubic, OpenAI mean/std), as transformers does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreprocessorConfig {
    pub do_resize: bool,
    pub size: ResizeSize,
    pub resample: ResampleFilter,
    pub do_center_crop: bool,
    pub crop_size: CropSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(deserialize_with = "de_mean")]
    pub image_mean: [f64; 3],
    #[serde(deserialize_with = "de_std")]
    pub image_std: [f64; 3],
    /// Our loader always yields RGB; kept so the file round-trips.
    #[serde(deserialize_with = "de_opt_bool")]
    pub do_convert_rgb: bool,
    /// Everything else (`image_processor_type`, `processor_class`, `crop_pct`, ...), preserved so
    /// that a config we write back is the one we read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeSize::ShortestEdge {
                shortest_edge: 224,
                longest_edge: None,
            },
            resample: ResampleFilter::Bicubic,
            do_center_crop: true,
            crop_size: CropSize {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            extra: serde_json::Map::new(),
        }
    }
}

impl PreprocessorConfig {
    /// CLIP's processor at a given square resolution (224 for ViT-L/14, 336 for LLaVA-1.5).
    pub fn clip(resolution: u32) -> Self {
        Self {
            size: ResizeSize::ShortestEdge {
                shortest_edge: resolution,
                longest_edge: None,
            },
            crop_size: CropSize {
                height: resolution,
                width: resolution,
            },
            ..Self::default()
        }
    }

    /// Reads and validates a `preprocessor_config.json`; errors name the file (and the field).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::ConfigIo {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates config JSON; `name` is used in error messages (a path or a label).
    pub fn from_json_str(json: &str, name: &str) -> Result<Self, ImageError> {
        let cfg: Self = serde_json::from_str(json).map_err(|source| ImageError::ConfigParse {
            path: name.to_string(),
            source,
        })?;
        cfg.validate(name)?;
        Ok(cfg)
    }

    /// Checks the values that parse but cannot be honoured.
    pub fn validate(&self, name: &str) -> Result<(), ImageError> {
        let bad = |field, reason: String| ImageError::ConfigInvalid {
            path: name.to_string(),
            field,
            reason,
        };
        if !self.rescale_factor.is_finite() {
            return Err(bad(
                "rescale_factor",
                format!("{} is not finite", self.rescale_factor),
            ));
        }
        if let Some(v) = self.image_mean.iter().find(|v| !v.is_finite()) {
            return Err(bad("image_mean", format!("{v} is not finite")));
        }
        if let Some(v) = self.image_std.iter().find(|v| !v.is_finite() || **v == 0.0) {
            return Err(bad(
                "image_std",
                format!("{v} is not a finite non-zero number"),
            ));
        }
        let sides: &[(&'static str, u32)] = match self.size {
            ResizeSize::ShortestEdge { shortest_edge, .. } => &[("size", shortest_edge)],
            ResizeSize::Exact { height, width } => &[("size", height), ("size", width)],
        };
        let crop = [
            ("crop_size", self.crop_size.height),
            ("crop_size", self.crop_size.width),
        ];
        if let Some((field, side)) = sides.iter().chain(&crop).find(|(_, v)| *v > MAX_SIDE) {
            return Err(bad(
                field,
                format!("{side} px is larger than any vision tower takes (at most {MAX_SIDE})"),
            ));
        }
        if let ResizeSize::ShortestEdge {
            shortest_edge,
            longest_edge: Some(longest),
        } = self.size
            && longest < shortest_edge
        {
            return Err(bad(
                "size",
                format!("longest_edge {longest} < shortest_edge {shortest_edge}"),
            ));
        }
        Ok(())
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)` (truncation, not rounding).
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }
}

/// Any of the shapes `size`/`crop_size` take in the wild: a bare int, `[h, w]`, or a dict.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(u32),
    Pair(Vec<u32>),
    Map {
        shortest_edge: Option<u32>,
        longest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
        max_height: Option<u32>,
        max_width: Option<u32>,
    },
}

fn nonzero<E: serde::de::Error>(field: &str, v: u32) -> Result<u32, E> {
    if v == 0 {
        Err(E::custom(format!(
            "`{field}`: sizes must be positive, got 0"
        )))
    } else {
        Ok(v)
    }
}

impl<'de> Deserialize<'de> for ResizeSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Option::<RawSize>::deserialize(d).map_err(|e| {
            D::Error::custom(format!(
                "`size`: expected an int, [height, width] or a dict of shortest_edge/longest_edge/height/width ({e})"
            ))
        })?;
        // The precedence is transformers' `resize`: shortest(+longest), then height/width.
        Ok(match raw {
            None => PreprocessorConfig::default().size,
            // CLIP uses `default_to_square=False`: a bare int is the shortest edge.
            Some(RawSize::Int(n)) => ResizeSize::ShortestEdge {
                shortest_edge: nonzero::<D::Error>("size", n)?,
                longest_edge: None,
            },
            Some(RawSize::Pair(v)) => match v[..] {
                [height, width] => ResizeSize::Exact {
                    height: nonzero::<D::Error>("size", height)?,
                    width: nonzero::<D::Error>("size", width)?,
                },
                [n] => ResizeSize::ShortestEdge {
                    shortest_edge: nonzero::<D::Error>("size", n)?,
                    longest_edge: None,
                },
                _ => return Err(D::Error::custom("`size`: a list must have 1 or 2 elements")),
            },
            Some(RawSize::Map {
                shortest_edge,
                longest_edge,
                height,
                width,
                max_height,
                max_width,
            }) => match (shortest_edge, height, width) {
                (Some(s), _, _) => ResizeSize::ShortestEdge {
                    shortest_edge: nonzero::<D::Error>("size.shortest_edge", s)?,
                    longest_edge: longest_edge
                        .map(|l| nonzero::<D::Error>("size.longest_edge", l))
                        .transpose()?,
                },
                (None, Some(h), Some(w)) if max_height.is_none() && max_width.is_none() => {
                    ResizeSize::Exact {
                        height: nonzero::<D::Error>("size.height", h)?,
                        width: nonzero::<D::Error>("size.width", w)?,
                    }
                }
                _ => {
                    return Err(D::Error::custom(
                        "`size`: need `shortest_edge` or both `height` and `width` (longest_edge-only and max_height/max_width are not CLIP forms)",
                    ));
                }
            },
        })
    }
}

impl Serialize for ResizeSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = serde_json::Map::new();
        match *self {
            ResizeSize::ShortestEdge {
                shortest_edge,
                longest_edge,
            } => {
                m.insert("shortest_edge".into(), shortest_edge.into());
                if let Some(l) = longest_edge {
                    m.insert("longest_edge".into(), l.into());
                }
            }
            ResizeSize::Exact { height, width } => {
                m.insert("height".into(), height.into());
                m.insert("width".into(), width.into());
            }
        }
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for CropSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Option::<RawSize>::deserialize(d).map_err(|e| {
            D::Error::custom(format!(
                "`crop_size`: expected an int, [height, width] or {{\"height\", \"width\"}} ({e})"
            ))
        })?;
        let (height, width) = match raw {
            None => return Ok(PreprocessorConfig::default().crop_size),
            // transformers reads crop_size with `default_to_square=True`.
            Some(RawSize::Int(n)) => (n, n),
            Some(RawSize::Pair(v)) => match v[..] {
                [h, w] => (h, w),
                [n] => (n, n),
                _ => {
                    return Err(D::Error::custom(
                        "`crop_size`: a list must have 1 or 2 elements",
                    ));
                }
            },
            Some(RawSize::Map {
                height: Some(h),
                width: Some(w),
                ..
            }) => (h, w),
            Some(RawSize::Map { .. }) => {
                return Err(D::Error::custom(
                    "`crop_size`: a dict must have both `height` and `width`",
                ));
            }
        };
        Ok(CropSize {
            height: nonzero::<D::Error>("crop_size.height", height)?,
            width: nonzero::<D::Error>("crop_size.width", width)?,
        })
    }
}

/// `image_mean`/`image_std`: a list of 3 or one number for all channels (transformers accepts both).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawChannels {
    One(f64),
    Many(Vec<f64>),
}

fn de_channels<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<[f64; 3], D::Error> {
    match RawChannels::deserialize(d) {
        Ok(RawChannels::One(v)) => Ok([v; 3]),
        Ok(RawChannels::Many(v)) => <[f64; 3]>::try_from(v.as_slice()).map_err(|_| {
            D::Error::custom(format!(
                "`{field}`: expected 3 values (RGB), got {}",
                v.len()
            ))
        }),
        Err(e) => Err(D::Error::custom(format!(
            "`{field}`: expected a number or a list of 3 numbers ({e})"
        ))),
    }
}

fn de_mean<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 3], D::Error> {
    de_channels(d, "image_mean")
}

fn de_std<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 3], D::Error> {
    de_channels(d, "image_std")
}

/// `do_convert_rgb` is `null` in some configs, meaning the default (true).
fn de_opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}
