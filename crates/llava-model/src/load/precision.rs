//! The precision a layer is asked to load in: a plain setting that the loader carries from the
//! command line to the layers, without knowing how a layer quantizes.

/// Which quantization the decoder's linear layers are loaded with
/// ([`crate::model::quantized`] does the work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// `--load-8bit`
    Bits8,
    /// `--load-4bit`
    Bits4,
}
