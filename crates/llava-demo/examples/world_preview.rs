//! Writes a small shapes world to the given folder, for looking at.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/world-preview".into());
    let config = llava_demo::world::WorldConfig {
        seed: 1,
        image_size: 64,
        train: 20,
        val: 2,
        test: 5,
    };
    llava_demo::world::write_world(&config, &llava_demo::world::WorldPaths::new(&out))?;
    Ok(())
}
