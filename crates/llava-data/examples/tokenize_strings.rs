//! Tokenises a JSON list of strings with a checkpoint directory's tokenizer (tokenizer.json, or
//! tokenizer.model converted) and prints `{"ids": [...], "decoded": [...]}`: the Rust half of
//! `tools/check_sentencepiece.sh`, which compares it with transformers on a real model.
//!
//! cargo run --release -p llava-data --example tokenize_strings -- DIR STRINGS.json

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, strings] = args.as_slice() else {
        return Err("usage: tokenize_strings DIR STRINGS.json".into());
    };
    let start = std::time::Instant::now();
    let tok = llava_data::tokenizer::Tokenizer::from_dir(Path::new(dir))?;
    eprintln!(
        "tokenizer loaded in {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let strings: Vec<String> = serde_json::from_str(&std::fs::read_to_string(strings)?)?;
    let mut ids = Vec::new();
    let mut decoded = Vec::new();
    for s in &strings {
        ids.push(tok.encode(s, true)?);
        decoded.push(tok.decode(&tok.encode(s, false)?, true)?);
    }
    println!("{}", serde_json::json!({"ids": ids, "decoded": decoded}));
    Ok(())
}
