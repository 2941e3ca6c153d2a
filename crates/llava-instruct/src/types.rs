//! The response types, and the settings shared by the run and the preview.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::InstructError;

/// A kind of generated sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstructType {
    /// Multi-turn dialogue about the image (teacher sees captions only).
    Conversation,
    /// One detailed description (teacher sees captions and boxes).
    Detail,
    /// One question needing reasoning, with a detailed answer (captions and boxes).
    Complex,
    /// The naive baseline: a brief-description instruction answered by a caption; no teacher.
    Brief,
}

impl InstructType {
    pub const ALL: [InstructType; 4] = [
        InstructType::Conversation,
        InstructType::Detail,
        InstructType::Complex,
        InstructType::Brief,
    ];
    /// The three types that need the teacher.
    pub const TEACHER: [InstructType; 3] = [
        InstructType::Conversation,
        InstructType::Detail,
        InstructType::Complex,
    ];

    pub fn name(self) -> &'static str {
        match self {
            InstructType::Conversation => "conversation",
            InstructType::Detail => "detail",
            InstructType::Complex => "complex",
            InstructType::Brief => "brief",
        }
    }

    /// The output file holding this type's records.
    pub fn file_name(self) -> &'static str {
        match self {
            InstructType::Conversation => "conversation.jsonl",
            InstructType::Detail => "detail.jsonl",
            InstructType::Complex => "complex.jsonl",
            InstructType::Brief => "brief.jsonl",
        }
    }

    /// Whether the teacher sees the boxes for this type.
    pub fn uses_boxes(self) -> bool {
        matches!(self, InstructType::Detail | InstructType::Complex)
    }

    pub fn needs_teacher(self) -> bool {
        self != InstructType::Brief
    }
}

impl fmt::Display for InstructType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InstructType {
    type Err = InstructError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "conversation" | "conv" => Ok(InstructType::Conversation),
            "detail" | "detailed" | "description" => Ok(InstructType::Detail),
            "complex" | "complex_reasoning" | "reasoning" => Ok(InstructType::Complex),
            "brief" => Ok(InstructType::Brief),
            other => Err(InstructError::InvalidArgument(format!(
                "unknown type `{other}`; expected conversation, detail, complex or brief"
            ))),
        }
    }
}

/// Parses a comma-separated type list, keeping order and dropping repeats.
pub fn parse_types(s: &str) -> Result<Vec<InstructType>, InstructError> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let t: InstructType = part.parse()?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(InstructError::InvalidArgument("no types given".into()));
    }
    Ok(out)
}

/// Parses per-type caps: `conversation=58000,detail=23000,complex=77000`.
pub fn parse_type_limits(
    s: &str,
) -> Result<std::collections::BTreeMap<InstructType, usize>, InstructError> {
    let mut out = std::collections::BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (t, n) = part.split_once('=').ok_or_else(|| {
            InstructError::InvalidArgument(format!(
                "type limit must be TYPE=N, got `{}`",
                part.trim()
            ))
        })?;
        let ty: InstructType = t.parse()?;
        let n: usize = n.trim().parse().map_err(|_| {
            InstructError::InvalidArgument(format!(
                "type limit of {ty} must be a number, got `{}`",
                n.trim()
            ))
        })?;
        out.insert(ty, n);
    }
    Ok(out)
}

/// A deterministic partition of the images: shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl Shard {
    /// Whether the image with this record id belongs to the shard. The assignment depends only
    /// on the id (a stable FNV-1a hash), not on input order or on the other images.
    pub fn contains(&self, id: &str) -> bool {
        self.count <= 1 || fnv1a(id.as_bytes()) % u64::from(self.count) == u64::from(self.index)
    }
}

impl FromStr for Shard {
    type Err = InstructError;
    /// `i/n` with `0 <= i < n`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            InstructError::InvalidArgument(format!(
                "shard must be `i/n` with 0 <= i < n, got `{s}`"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// 64-bit FNV-1a: stable across platforms, Rust versions and runs.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The seed of the random choices (instruction paraphrase, `<image>` placement, caption) of
/// one (image, type) pair: independent of run order, so resumed runs make the same choices.
pub fn pair_seed(seed: u64, id: &str, ty: InstructType) -> u64 {
    let mut bytes = seed.to_le_bytes().to_vec();
    bytes.extend_from_slice(ty.name().as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(id.as_bytes());
    fnv1a(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_lists() {
        assert_eq!(
            parse_types("detail, conversation,detail").unwrap(),
            vec![InstructType::Detail, InstructType::Conversation]
        );
        assert!(parse_types("detail,nope").is_err());
        assert!(parse_types(" , ").is_err());
        assert_eq!(
            "complex_reasoning".parse::<InstructType>().unwrap(),
            InstructType::Complex
        );
    }

    #[test]
    fn shards_partition_ids() {
        assert!("3/2".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        let mut sizes = [0usize; 3];
        for n in 0..3000 {
            let id = format!("{n:012}");
            let owners: Vec<usize> = (0..3).filter(|&i| shards[i].contains(&id)).collect();
            assert_eq!(owners.len(), 1, "{id} must be in exactly one shard");
            sizes[owners[0]] += 1;
        }
        // roughly balanced
        assert!(sizes.iter().all(|&s| s > 800), "{sizes:?}");
        assert!(Shard::default().contains("anything"));
    }

    #[test]
    fn fnv_is_the_reference_function() {
        // FNV-1a 64 test vectors
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_ne!(
            pair_seed(1, "x", InstructType::Detail),
            pair_seed(1, "x", InstructType::Complex)
        );
        assert_ne!(
            pair_seed(1, "x", InstructType::Detail),
            pair_seed(2, "x", InstructType::Detail)
        );
    }
}
