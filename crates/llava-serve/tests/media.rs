//! Where images may come from: data: URLs in every format, files only under the allowed folder
//! (not through `..` or a symlink out of it), remote URLs only to public addresses unless the
//! host is allowed, with each redirect checked again.

mod common;

use std::path::Path;

use common::*;
use llava_serve::{MediaPolicy, ServeConfig};
use serde_json::{Value, json};

const PARAM: Option<&str> = Some("messages[0].content[0].image_url.url");

fn ask(url: &str) -> Value {
    greedy(
        json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is it?"}]}]),
        2,
    )
}

fn with_media(media: MediaPolicy) -> ServeConfig {
    let defaults = ServeConfig::default();
    ServeConfig {
        media: MediaPolicy {
            max_image_bytes: defaults.media.max_image_bytes,
            fetch_timeout: defaults.media.fetch_timeout,
            max_redirects: 3,
            ..media
        },
        ..defaults
    }
}

#[test]
fn data_urls_take_png_jpeg_webp_and_gif() {
    let s = TestServer::start(ServeConfig::default()).ready();
    for name in [
        "rgb_20x13.png",
        "photo444_96x64.jpg",
        "lossless_26x34.webp",
        "anim_31x23.gif",
    ] {
        let url = data_url(&fixtures().join("images").join(name));
        let r = s.chat(&ask(&url));
        assert_eq!(r.status(), 200, "{name}: {}", r.text().unwrap_or_default());
    }
}

#[test]
fn files_are_read_only_inside_the_allowed_folder() {
    let root = tempfile::tempdir().expect("tempdir");
    let allowed = root.path().join("allowed");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&allowed).expect("dir");
    std::fs::create_dir_all(&outside).expect("dir");
    let img = image_path("small_24x20.png");
    std::fs::copy(&img, allowed.join("in.png")).expect("copy");
    std::fs::copy(&img, outside.join("out.png")).expect("copy");
    std::os::unix::fs::symlink(outside.join("out.png"), allowed.join("link.png")).expect("symlink");

    let off = TestServer::start(ServeConfig::default()).ready();
    let inside = allowed.join("in.png");
    assert_error(off.chat(&ask(&inside.to_string_lossy())), 400, PARAM);

    let s = TestServer::start(with_media(MediaPolicy {
        allowed_local_media_path: Some(allowed.clone()),
        ..MediaPolicy::default()
    }))
    .ready();
    let file_url = format!("file://{}", inside.display());
    for ok in [
        inside.to_string_lossy().into_owned(),
        file_url,
        "in.png".into(),
    ] {
        assert_eq!(s.chat(&ask(&ok)).status(), 200, "{ok}");
    }
    for refused in [
        allowed.join("../outside/out.png"),
        Path::new("../outside/out.png").to_path_buf(),
        allowed.join("link.png"),
        allowed.join("missing.png"),
        allowed.clone(),
    ] {
        let message = assert_error(s.chat(&ask(&refused.to_string_lossy())), 400, PARAM);
        assert!(message.contains("not a file under"), "{message}");
    }
}

#[test]
fn remote_images_reach_only_allowed_addresses() {
    let addr = ImageServer::start().addr;
    let url = |path: &str| format!("http://{addr}{path}");

    let off = TestServer::start(ServeConfig::default()).ready();
    let message = assert_error(off.chat(&ask(&url("/img.png"))), 400, PARAM);
    assert!(message.contains("--allow-remote-images"), "{message}");

    // Remote images on, but 127.0.0.1 is loopback: refused, by address or by a name.
    let public_only = TestServer::start(with_media(MediaPolicy {
        allow_remote_images: true,
        ..MediaPolicy::default()
    }))
    .ready();
    for refused in [
        url("/img.png"),
        format!("http://localhost:{}/img.png", addr.port()),
    ] {
        let message = assert_error(public_only.chat(&ask(&refused)), 400, PARAM);
        assert!(message.contains("non-public"), "{message}");
    }

    // 127.0.0.1 allowed by name: its image is fetched, and a redirect back to itself too, but
    // a redirect to `localhost` (not named) is checked again and refused, and so is a loop.
    let allowed = TestServer::start(with_media(MediaPolicy {
        allow_remote_images: true,
        allowed_media_domains: vec!["127.0.0.1".into()],
        ..MediaPolicy::default()
    }))
    .ready();
    assert_eq!(allowed.chat(&ask(&url("/img.png"))).status(), 200);
    assert_eq!(allowed.chat(&ask(&url("/to-allowed"))).status(), 200);
    let message = assert_error(allowed.chat(&ask(&url("/to-localhost"))), 400, PARAM);
    assert!(message.contains("localhost"), "{message}");
    let message = assert_error(allowed.chat(&ask(&url("/loop"))), 400, PARAM);
    assert!(message.contains("redirected more than 3"), "{message}");
}
