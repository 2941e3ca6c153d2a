//! `preprocessor_config.json` variants and the typed error paths of loading/decoding.

use std::path::{Path, PathBuf};

use llava_data::image::{
    CropSize, ImageAspectRatio, ImageError, ImageProcessor, LoadOptions, OPENAI_CLIP_MEAN,
    PreprocessorConfig, ResampleFilter, ResizeSize, RgbImage, center_crop, decode_image,
    expand_to_square, load_image, resize_output_size,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

fn parse(json: &str) -> Result<PreprocessorConfig, ImageError> {
    PreprocessorConfig::from_json_str(json, "test.json")
}

#[test]
fn llava_hf_15_config() {
    // llava-hf/llava-1.5-7b-hf's preprocessor_config.json.
    let cfg = parse(
        r#"{
          "crop_size": {"height": 336, "width": 336},
          "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true,
          "do_rescale": true, "do_resize": true,
          "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_processor_type": "CLIPImageProcessor",
          "image_std": [0.26862954, 0.26130258, 0.27577711],
          "processor_class": "LlavaProcessor", "resample": 3,
          "rescale_factor": 0.00392156862745098,
          "size": {"shortest_edge": 336}
        }"#,
    )
    .unwrap();
    assert_eq!(cfg, {
        let mut c = PreprocessorConfig::clip(336);
        c.extra = cfg.extra.clone();
        c
    });
    assert_eq!(cfg.extra["processor_class"], "LlavaProcessor");
    assert_eq!(cfg.pad_color(), [122, 116, 104]);
    // Round trip keeps the HF shape.
    let back: serde_json::Value = serde_json::to_value(&cfg).unwrap();
    assert_eq!(back["size"], serde_json::json!({"shortest_edge": 336}));
    assert_eq!(
        back["crop_size"],
        serde_json::json!({"height": 336, "width": 336})
    );
    assert_eq!(back["resample"], 3);
    assert_eq!(back["image_processor_type"], "CLIPImageProcessor");
    assert_eq!(parse(&back.to_string()).unwrap(), cfg);
}

#[test]
fn old_style_bare_ints_and_defaults() {
    // openai/clip-vit-large-patch14's original config: bare ints, no rescale fields.
    let cfg = parse(
        r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
    )
    .unwrap();
    assert_eq!(
        cfg.size,
        ResizeSize::ShortestEdge {
            shortest_edge: 224,
            longest_edge: None
        }
    );
    assert_eq!(
        cfg.crop_size,
        CropSize {
            height: 224,
            width: 224
        }
    );
    assert!(cfg.do_rescale);
    assert_eq!(cfg.rescale_factor, 1.0 / 255.0);

    // Everything missing: CLIP's defaults.
    let empty = parse("{}").unwrap();
    assert_eq!(empty, PreprocessorConfig::default());
    assert_eq!(empty.resample, ResampleFilter::Bicubic);
    assert_eq!(empty.image_mean, OPENAI_CLIP_MEAN);
    // Nulls mean defaults too.
    assert_eq!(
        parse(r#"{"crop_size": null, "do_convert_rgb": null, "resample": null}"#).unwrap(),
        empty
    );
}

#[test]
fn size_forms() {
    let size = |j: &str| parse(&format!(r#"{{"size": {j}}}"#)).map(|c| c.size);
    assert_eq!(
        size(r#"{"height": 30, "width": 40}"#).unwrap(),
        ResizeSize::Exact {
            height: 30,
            width: 40
        }
    );
    assert_eq!(
        size("[30, 40]").unwrap(),
        ResizeSize::Exact {
            height: 30,
            width: 40
        }
    );
    assert_eq!(
        size(r#"{"shortest_edge": 30, "longest_edge": 50}"#).unwrap(),
        ResizeSize::ShortestEdge {
            shortest_edge: 30,
            longest_edge: Some(50)
        }
    );
    let c = parse(r#"{"crop_size": [20, 30], "image_mean": 0.5, "image_std": [0.5, 0.5, 0.5]}"#)
        .unwrap();
    assert_eq!(
        c.crop_size,
        CropSize {
            height: 20,
            width: 30
        }
    );
    assert_eq!(c.image_mean, [0.5; 3]);
    assert_eq!(c.pad_color(), [127; 3]);
}

#[test]
fn bad_configs_are_typed_errors_naming_file_and_field() {
    let cases = [
        (r#"{"size": {"longest_edge": 30}}"#, "size"),
        (r#"{"size": {"shortest_edge": 0}}"#, "size.shortest_edge"),
        (r#"{"size": "big"}"#, "size"),
        (r#"{"crop_size": {"shortest_edge": 30}}"#, "crop_size"),
        (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
        (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
        (r#"{"resample": 0}"#, "resample"),
        (r#"{"resample": 7}"#, "resample"),
        (r#"{"do_resize": "yes"}"#, "test.json"),
        (
            r#"{"size": {"shortest_edge": 30, "longest_edge": 20}}"#,
            "size",
        ),
        ("not json", "test.json"),
        // Would ask for gigabytes per image.
        (
            r#"{"size": {"shortest_edge": 1000000000}}"#,
            "larger than any",
        ),
        (r#"{"size": {"height": 336, "width": 99999}}"#, "size"),
        (r#"{"crop_size": 20000}"#, "crop_size"),
    ];
    for (json, needle) in cases {
        let err = parse(json).expect_err(json);
        assert!(
            matches!(
                err,
                ImageError::ConfigParse { .. } | ImageError::ConfigInvalid { .. }
            ),
            "{json}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("test.json"), "{json}: {msg}");
        assert!(msg.contains(needle), "{json}: {msg} lacks {needle}");
    }
    let err = PreprocessorConfig::from_file("/nonexistent/preprocessor_config.json").unwrap_err();
    assert!(matches!(err, ImageError::ConfigIo { .. }));
    assert!(
        err.to_string()
            .contains("/nonexistent/preprocessor_config.json")
    );
}

#[test]
fn aspect_ratio_names() {
    assert_eq!(
        "pad".parse::<ImageAspectRatio>().unwrap(),
        ImageAspectRatio::Pad
    );
    assert_eq!(
        "square".parse::<ImageAspectRatio>().unwrap(),
        ImageAspectRatio::Square
    );
    assert!(matches!(
        "anyres".parse::<ImageAspectRatio>(),
        Err(ImageError::UnsupportedAspectRatio(_))
    ));
    let a: ImageAspectRatio = serde_json::from_str("\"pad\"").unwrap();
    assert_eq!(a, ImageAspectRatio::Pad);
}

#[test]
fn load_errors_are_typed_and_name_the_file() {
    let missing = fixtures().join("does_not_exist.png");
    let err = load_image(&missing).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("does_not_exist.png"));

    let err = load_image(fixtures().join("truncated.png")).unwrap_err();
    assert!(matches!(err, ImageError::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated.png"));

    let err = load_image(fixtures().join("not_an_image.png")).unwrap_err();
    assert!(matches!(err, ImageError::UnknownFormat { .. }), "{err:?}");
    assert!(err.to_string().contains("not_an_image.png"));

    let opts = LoadOptions::default();
    for bytes in [
        &b""[..],
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"GIF89a",
        b"BM",
    ] {
        let err = decode_image(bytes, "upload", &opts).unwrap_err();
        assert!(err.to_string().contains("upload"), "{err}");
    }
    let proc = ImageProcessor::default();
    assert!(proc.preprocess_bytes(b"garbage", "upload").is_err());
    assert!(matches!(
        proc.preprocess(&RgbImage::new(0, 0)),
        Err(ImageError::EmptySize { .. })
    ));
}

#[test]
fn output_size_rounding() {
    let se = |s| ResizeSize::ShortestEdge {
        shortest_edge: s,
        longest_edge: None,
    };
    // int(30 * 20 / 13) = int(46.15) = 46; the long edge is truncated, not rounded.
    assert_eq!(resize_output_size(20, 13, &se(30)), (46, 30));
    assert_eq!(resize_output_size(13, 20, &se(30)), (30, 46));
    assert_eq!(resize_output_size(300, 200, &se(224)), (336, 224));
    assert_eq!(resize_output_size(640, 480, &se(336)), (448, 336));
    // 1000x333 -> int(336*1000/333) = 1009
    assert_eq!(resize_output_size(1000, 333, &se(336)), (1009, 336));
    let capped = ResizeSize::ShortestEdge {
        shortest_edge: 30,
        longest_edge: Some(40),
    };
    // raw = 40*20/100 = 8 -> (h, w) = (8, int(8*100/20)=40)
    assert_eq!(resize_output_size(100, 20, &capped), (40, 8));
}

#[test]
fn crop_offsets_and_padding() {
    let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb(image_px(x, y)));
    // (4-3)//2 = 0, (5-2)//2 = 1
    let c = center_crop(&img, 2, 3);
    assert_eq!(c.get_pixel(0, 0).0, image_px(1, 0));
    // Crop larger than the image: floor offsets -> image at ceil((crop - size) / 2).
    let c = center_crop(&img, 8, 7);
    assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(c.get_pixel(2, 2).0, image_px(0, 0));
    assert_eq!(c.get_pixel(6, 5).0, image_px(4, 3));
    assert_eq!(c.get_pixel(7, 6).0, [0, 0, 0]);
}

fn image_px(x: u32, y: u32) -> [u8; 3] {
    [x as u8 * 10 + 1, y as u8 * 10 + 1, 7]
}

#[test]
fn expand_to_square_offsets() {
    let tall = RgbImage::from_fn(3, 6, |x, y| image::Rgb(image_px(x, y)));
    let sq = expand_to_square(&tall, [1, 2, 3]);
    assert_eq!(sq.dimensions(), (6, 6));
    // (6 - 3) // 2 = 1
    assert_eq!(sq.get_pixel(0, 0).0, [1, 2, 3]);
    assert_eq!(sq.get_pixel(1, 0).0, image_px(0, 0));
    assert_eq!(sq.get_pixel(3, 5).0, image_px(2, 5));
    assert_eq!(sq.get_pixel(4, 5).0, [1, 2, 3]);
}
