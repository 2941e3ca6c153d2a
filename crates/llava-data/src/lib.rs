//! Everything between files on disk and token ids / pixel tensors: LLaVA dataset records, COCO
//! annotations, conversation templates and label masks, the tokenizer, and CLIP image
//! preprocessing. Deliberately free of candle so that data tools build fast; tensors are made
//! by `llava-model` from the plain buffers returned here.

pub mod chat_template;
pub mod coco;
pub mod conversation;
pub mod image;
pub mod prompt;
pub mod record;
pub mod sample;
pub mod sentencepiece;
pub mod tokenizer;
