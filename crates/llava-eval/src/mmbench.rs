//! MMBench, the multiple-choice benchmark LLaVA-1.5 reports, from its TSV release (`index`,
//! `question`, `hint`, options `A`…, `answer`, `category`, and the image in base64).
//!
//! Its circular evaluation asks each question once per rotation of its options (the options
//! shifted by one each time, so every option is asked in every place) and counts a question
//! right only when every rotation is answered right: guessing and a bias toward one letter
//! then earn nothing. The TSV becomes a multiple-choice file for `eval mc`, one line per
//! rotation with the id `{index}-{rotation}`, plus the images as files; [`score_mmbench`] then
//! groups the answers back by index.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use base64::Engine;

use crate::error::EvalError;
use crate::jsonl::{Answer, QuestionId};
use crate::mc::{McQuestion, McSummary, option_letter, parse_choice};

/// One MMBench question as the TSV holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct MmbenchRow {
    pub index: String,
    pub question: String,
    pub hint: Option<String>,
    pub options: Vec<String>,
    /// The right option's index (0 = `A`).
    pub answer: usize,
    pub category: String,
    /// The image file's bytes.
    pub image: Vec<u8>,
}

/// A cell that pandas wrote for a missing value.
fn present(cell: &str) -> Option<&str> {
    let c = cell.trim();
    (!c.is_empty() && c != "nan").then_some(c)
}

/// Reads the TSV. Options run from `A` while present. A row whose image cell holds another
/// row's index (as MMBench writes repeated images) takes that row's image. A row without an
/// answer (the test split, which MMBench's server scores) or with a bad image is an error
/// naming it.
pub fn read_mmbench_tsv(path: &Path) -> Result<Vec<MmbenchRow>, EvalError> {
    let bad = |message: String| EvalError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_path(path)
        .map_err(|e| bad(e.to_string()))?;
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let need = |name: &str| column(name).ok_or_else(|| bad(format!("no `{name}` column")));
    let (index, question, image) = (need("index")?, need("question")?, need("image")?);
    let answer = need("answer")?;
    let (hint, category) = (column("hint"), column("category"));
    let letters: Vec<usize> = (0..26)
        .map_while(|i| option_letter(i).and_then(|l| column(&l.to_string())))
        .collect();
    let mut rows = Vec::new();
    let mut images: HashMap<String, Vec<u8>> = HashMap::new();
    for (n, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let cell = |i: usize| record.get(i).unwrap_or("");
        let row_index = cell(index).trim().to_string();
        let at = |message: String| bad(format!("row {} (index {row_index}): {message}", n + 2));
        let options: Vec<String> = letters
            .iter()
            .map_while(|&c| present(cell(c)).map(str::to_string))
            .collect();
        if options.len() < 2 {
            return Err(at("fewer than two options".into()));
        }
        let key = present(cell(answer)).ok_or_else(|| {
            at("no answer (the test split is scored by MMBench's own server)".into())
        })?;
        let answer = key
            .chars()
            .next()
            .and_then(|c| (c.is_ascii_uppercase()).then(|| c as usize - 'A' as usize))
            .filter(|&i| key.len() == 1 && i < options.len())
            .ok_or_else(|| at(format!("the answer {key:?} names no option")))?;
        let raw = cell(image).trim();
        let image = match images.get(raw) {
            // A short cell naming an earlier row: that row's image.
            Some(bytes) if raw.len() < 64 => bytes.clone(),
            _ => base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|e| at(format!("the image is not base64: {e}")))?,
        };
        images.insert(row_index.clone(), image.clone());
        rows.push(MmbenchRow {
            index: row_index,
            question: cell(question).trim().to_string(),
            hint: hint.and_then(|h| present(cell(h))).map(str::to_string),
            options,
            answer,
            category: category
                .and_then(|c| present(cell(c)))
                .unwrap_or("")
                .to_string(),
            image,
        });
    }
    Ok(rows)
}

/// The image's file extension from its first bytes (`jpg` where they name no format).
fn extension(image: &[u8]) -> &'static str {
    image::guess_format(image)
        .ok()
        .and_then(|format| format.extensions_str().first().copied())
        .unwrap_or("jpg")
}

/// The multiple-choice lines for `rows` (`rotations`: every rotation of the options, or
/// only the first), as `McQuestion` JSON; each image is written to `image_dir/{index}.{ext}`.
/// The hint goes before the question on its own line, as LLaVA's MMBench script asks.
pub fn mmbench_questions(
    rows: &[MmbenchRow],
    image_dir: &Path,
    rotations: bool,
) -> Result<Vec<serde_json::Value>, EvalError> {
    std::fs::create_dir_all(image_dir).map_err(EvalError::io(image_dir))?;
    let mut lines = Vec::new();
    for row in rows {
        let file = format!("{}.{}", row.index, extension(&row.image));
        let path = image_dir.join(&file);
        std::fs::write(&path, &row.image).map_err(EvalError::io(&path))?;
        let question = match &row.hint {
            Some(hint) => format!("{hint}\n{}", row.question),
            None => row.question.clone(),
        };
        let n = row.options.len();
        for r in 0..if rotations { n } else { 1 } {
            let options: Vec<&String> = (0..n).map(|i| &row.options[(i + r) % n]).collect();
            lines.push(serde_json::json!({
                "question_id": format!("{}-{r}", row.index),
                "question": question,
                "options": options,
                "answer": (row.answer + n - r) % n,
                "category": row.category,
                "image": file,
            }));
        }
    }
    Ok(lines)
}

/// Circular accuracy: a question (all lines `{index}-{rotation}` of one index) is right when
/// every rotation is, and read when every reply named an option. Overall and per category;
/// a question with a rotation unanswered is not scored, and such questions are counted.
pub fn score_mmbench(
    questions: &[McQuestion],
    answers: &HashMap<QuestionId, Answer>,
) -> (McSummary, usize) {
    /// One question's rotations so far.
    struct Rounds<'a> {
        category: Option<&'a str>,
        answered: bool,
        right: bool,
        read: bool,
    }
    let mut groups: BTreeMap<String, Rounds> = BTreeMap::new();
    for q in questions {
        let id = q.question_id.to_string();
        let index = id
            .rsplit_once('-')
            .map_or(id.as_str(), |(i, _)| i)
            .to_string();
        let reply = answers.get(&q.question_id);
        let predicted = reply.and_then(|a| parse_choice(&a.text, q.options.len()));
        let g = groups.entry(index).or_insert(Rounds {
            category: q.category.as_deref(),
            answered: true,
            right: true,
            read: true,
        });
        g.answered &= reply.is_some();
        g.right &= predicted.is_some() && predicted == q.answer_index();
        g.read &= predicted.is_some();
    }
    let mut summary = McSummary::default();
    let mut missing = 0;
    for g in groups.values() {
        if !g.answered {
            missing += 1;
            continue;
        }
        summary.record(g.category, |a| a.record(g.right, g.read));
    }
    (summary, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = &[0x89, b'P', b'N', b'G', 13, 10, 26, 10, 1, 2, 3];

    fn tsv(dir: &Path, rows: &[&str]) -> std::path::PathBuf {
        let path = dir.join("mmbench.tsv");
        let mut text = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n".to_string();
        for r in rows {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn rows_rotations_and_repeated_images() {
        let dir = tempfile::tempdir().expect("tmp");
        let b64 = base64::engine::general_purpose::STANDARD.encode(PNG);
        let path = tsv(
            dir.path(),
            &[
                &format!("7\tWhat colour?\tA sunny day.\tred\tblue\tgreen\tnan\tB\tcolour\t{b64}"),
                // A quoted cell with a tab inside, no hint, and the image of row 7.
                "8\t\"Which\tone?\"\tnan\tleft\tright\tnan\tnan\tA\tspatial\t7",
            ],
        );
        let rows = read_mmbench_tsv(&path).expect("reads");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].options, ["red", "blue", "green"]);
        assert_eq!(
            (rows[0].answer, rows[0].hint.as_deref()),
            (1, Some("A sunny day."))
        );
        assert_eq!(
            (rows[1].question.as_str(), rows[1].hint.as_deref()),
            ("Which\tone?", None)
        );
        assert_eq!(rows[1].image, PNG);

        let images = dir.path().join("images");
        let lines = mmbench_questions(&rows, &images, true).expect("questions");
        assert_eq!(lines.len(), 3 + 2, "one line per rotation");
        assert!(images.join("7.png").is_file());
        // Rotation 1 of row 7: blue, green, red; "blue" is now A.
        assert_eq!(lines[1]["question_id"], "7-1");
        assert_eq!(
            lines[1]["options"],
            serde_json::json!(["blue", "green", "red"])
        );
        assert_eq!(lines[1]["answer"], 0);
        assert_eq!(lines[0]["question"], "A sunny day.\nWhat colour?");
        // Every rotation's key names "blue".
        for line in &lines[..3] {
            let i = line["answer"].as_u64().expect("answer") as usize;
            assert_eq!(line["options"][i], "blue");
        }
        assert_eq!(
            mmbench_questions(&rows, &images, false)
                .expect("plain")
                .len(),
            2
        );
    }

    #[test]
    fn bad_rows_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = tsv(dir.path(), &["3\tQ?\tnan\tx\ty\tnan\tnan\tnan\tc\tAAAA"]);
        let e = read_mmbench_tsv(&path).expect_err("no answer").to_string();
        assert!(e.contains("index 3") && e.contains("no answer"), "{e}");
        let path = tsv(dir.path(), &["3\tQ?\tnan\tx\ty\tnan\tnan\tC\tc\tAAAA"]);
        let e = read_mmbench_tsv(&path).expect_err("bad key").to_string();
        assert!(e.contains("names no option"), "{e}");
        let path = tsv(
            dir.path(),
            &["3\tQ?\tnan\tx\ty\tnan\tnan\tA\tc\t!!notbase64"],
        );
        let e = read_mmbench_tsv(&path).expect_err("bad image").to_string();
        assert!(e.contains("base64"), "{e}");
    }

    #[test]
    fn a_question_counts_only_when_every_rotation_is_right() {
        let q = |id: &str, answer: usize, cat: &str| -> McQuestion {
            serde_json::from_value(serde_json::json!({
                "question_id": id, "question": "Q?", "options": ["x", "y"], "answer": answer,
                "category": cat}))
            .expect("question")
        };
        // Question 1: "x" is right (A, then B after rotation). Question 2 likewise.
        let questions = [
            q("1-0", 0, "c"),
            q("1-1", 1, "c"),
            q("2-0", 0, "c"),
            q("2-1", 1, "d"),
            q("3-0", 0, "c"),
            q("3-1", 1, "c"),
        ];
        let answer = crate::jsonl::test_answer;
        let answers: HashMap<_, _> = [
            answer("1-0", "A"),
            answer("1-1", "B"),
            // Always "A": right once, wrong once.
            answer("2-0", "A"),
            answer("2-1", "A"),
            // Question 3 has a rotation unanswered.
            answer("3-0", "A"),
        ]
        .into_iter()
        .collect();
        let (s, missing) = score_mmbench(&questions, &answers);
        assert_eq!(missing, 1);
        assert_eq!((s.overall.correct, s.overall.total), (1, 2));
        assert_eq!(s.categories["c"].accuracy, Some(50.0));
    }
}
