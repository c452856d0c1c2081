//! Questions with gold answers: the replay prompts a round samples groups for, and the held-out
//! items an evaluation runs. Both come from question files (JSON lines, `QUESTIONS.md`; the
//! retail data set's `questions.jsonl` is one), or, for replay prompts, from the train-split
//! episodes in the store.

use std::{
    collections::{HashSet, VecDeque},
    path::{Path, PathBuf},
};

use searchloop_core::{SolutionStep, Split, TaskInfo};
use searchloop_store_sql::{Page, Store, TrajectoryFilter};
use serde::{Deserialize, Serialize};

use crate::error::{LearnError, Result};

/// One question of a question file: a held-out item an evaluation runs, or a train-split
/// prompt a round samples a group for. The file format is in `QUESTIONS.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// The task item's id (`line-<n>` when the file gives none).
    pub id: String,
    /// The question.
    pub question: String,
    /// Every accepted answer (any one matches after normalisation).
    pub answers: Vec<String>,
    /// The task kind, free text (empty when the file gives none); results are reported and
    /// baselines kept per kind.
    pub kind: String,
    /// The tools a good episode calls to answer it (empty: not said).
    pub tools: Vec<String>,
    /// A worked solution, the tool calls that lead to the answer (empty: none given); a round
    /// with demonstrations on renders it into a teacher's episode.
    #[serde(default)]
    pub solution: Vec<SolutionStep>,
}

impl Question {
    /// The task metadata recorded with the question's episodes.
    pub fn task_info(&self, split: Split) -> TaskInfo {
        TaskInfo {
            task_id: self.id.clone(),
            gold_answers: self.answers.clone(),
            split,
            kind: self.kind.clone(),
            tools: self.tools.clone(),
        }
    }
}

/// One line of a question file.
#[derive(Debug, Deserialize)]
struct QuestionLine {
    #[serde(default)]
    id: Option<String>,
    question: String,
    answers: Vec<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    solution: Vec<SolutionStep>,
    #[serde(default)]
    split: Option<Split>,
}

impl QuestionLine {
    fn into_question(self, line: usize) -> Question {
        Question {
            id: self.id.unwrap_or_else(|| format!("line-{line}")),
            question: self.question,
            answers: self.answers,
            kind: self.kind.unwrap_or_default(),
            tools: self.tools,
            solution: self.solution,
        }
    }
}

/// Reads the lines of a question file whose split is `split` or absent, with their 1-based
/// line numbers. Lines without answers are left out: they can be neither rewarded nor scored.
fn read_lines(path: &Path, split: Split) -> Result<Vec<(usize, QuestionLine)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LearnError::io(format!("cannot read questions {}", path.display()), e))?;
    let bad = |line: usize, reason: String| LearnError::BadFile {
        path: PathBuf::from(path),
        reason: format!("line {line}: {reason}"),
    };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: QuestionLine =
            serde_json::from_str(raw).map_err(|e| bad(i + 1, e.to_string()))?;
        if line.question.trim().is_empty() {
            return Err(bad(i + 1, "the question is empty".into()));
        }
        if line.split.is_none_or(|s| s == split) && !line.answers.is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

/// The train-split questions of a question file (lines without a split count as train).
pub fn read_train_prompts(path: &Path) -> Result<Vec<Question>> {
    let prompts: Vec<Question> = read_lines(path, Split::Train)?
        .into_iter()
        .map(|(n, l)| l.into_question(n))
        .collect();
    if prompts.is_empty() {
        return Err(LearnError::BadFile {
            path: path.to_path_buf(),
            reason: "no train-split question with answers".into(),
        });
    }
    Ok(prompts)
}

/// Up to `limit` held-out questions of a question file (lines without a split count as held
/// out), taken in turn from each kind (kinds in the order they first appear, questions of a kind
/// in file order). So a small limit still measures every kind, whereas a plain prefix of a file
/// written kind by kind would measure only the first.
pub fn read_eval_items(path: &Path, limit: usize) -> Result<Vec<Question>> {
    let items: Vec<Question> = read_lines(path, Split::Heldout)?
        .into_iter()
        .map(|(n, l)| l.into_question(n))
        .collect();
    if items.is_empty() {
        return Err(LearnError::BadFile {
            path: path.to_path_buf(),
            reason: "no held-out question with answers".into(),
        });
    }
    Ok(interleave_kinds(items, limit))
}

/// The first `limit` questions of a round-robin over the kinds of `items`.
fn interleave_kinds(items: Vec<Question>, limit: usize) -> Vec<Question> {
    let mut by_kind: Vec<(String, VecDeque<Question>)> = Vec::new();
    for item in items {
        match by_kind.iter_mut().find(|(kind, _)| *kind == item.kind) {
            Some((_, queue)) => queue.push_back(item),
            None => by_kind.push((item.kind.clone(), [item].into())),
        }
    }
    let mut picked = Vec::new();
    while picked.len() < limit {
        let before = picked.len();
        for (_, queue) in &mut by_kind {
            if picked.len() == limit {
                break;
            }
            picked.extend(queue.pop_front());
        }
        if picked.len() == before {
            break;
        }
    }
    picked
}

/// How many logged episodes are scanned for distinct train-split questions.
const LOGGED_SCAN: usize = 2_000;

/// Up to `limit` distinct train-split questions (by task id) with gold answers, from the newest
/// logged episodes.
pub async fn logged_train_prompts(store: &Store, limit: usize) -> Result<Vec<Question>> {
    let filter = TrajectoryFilter {
        split: Some(Split::Train),
        ..TrajectoryFilter::default()
    };
    let page = store
        .list_trajectories(&filter, &Page::first(LOGGED_SCAN))
        .await?;
    let mut seen = HashSet::new();
    let mut prompts = Vec::new();
    for summary in page.items {
        if prompts.len() >= limit {
            break;
        }
        let Some(task_id) = summary.task_id.filter(|id| !seen.contains(id)) else {
            continue;
        };
        seen.insert(task_id.clone());
        // The summary has no gold answers; the full record does.
        let Some(task) = store
            .get_trajectory(&summary.id)
            .await?
            .and_then(|t| t.task)
        else {
            continue;
        };
        if task.gold_answers.is_empty() {
            continue;
        }
        prompts.push(Question {
            id: task_id,
            question: summary.question,
            answers: task.gold_answers,
            kind: task.kind,
            tools: Vec::new(),
            solution: Vec::new(),
        });
    }
    Ok(prompts)
}

/// `n` prompts for round `round`: consecutive windows of a seeded order, so successive rounds
/// walk through every prompt before repeating one.
pub fn pick_prompts(prompts: &[Question], n: usize, round: u64, seed: u64) -> Vec<Question> {
    if prompts.is_empty() {
        return Vec::new();
    }
    let len = prompts.len();
    // A fixed stride coprime with the length visits every index once per pass; the seed picks
    // where the walk starts.
    let stride = (1..=len)
        .rev()
        .find(|s| gcd(*s, len) == 1 && *s <= len / 2 + 1)
        .unwrap_or(1);
    let start = (seed % len as u64) as usize;
    (0..n.min(len))
        .map(|k| {
            let step = (round as usize).wrapping_mul(n).wrapping_add(k) % len;
            prompts[(start + step * stride) % len].clone()
        })
        .collect()
}

/// The prompts whose kind is one of `kinds` (all of them when `kinds` is empty). Prompts
/// there are but none of those kinds is an error naming the kinds, not a round without groups.
pub fn of_kinds(prompts: Vec<Question>, kinds: &[String]) -> Result<Vec<Question>> {
    if kinds.is_empty() || prompts.is_empty() {
        return Ok(prompts);
    }
    let kept: Vec<Question> = prompts
        .into_iter()
        .filter(|q| kinds.contains(&q.kind))
        .collect();
    if kept.is_empty() {
        return Err(LearnError::Config(format!(
            "prompt_kinds {kinds:?}: no train-split prompt is of these kinds"
        )));
    }
    Ok(kept)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("questions.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn question_files_split_into_train_and_heldout() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"{"id":"q1","question":"A?","answers":["a"],"kind":"single_hop","split":"train","tools":["catalog"],"skus":["S1"]}
{"id":"q2","question":"B?","answers":["b"],"split":"heldout"}

{"question":"C?","answers":["c"]}
{"id":"q4","question":"D?","answers":[],"split":"train"}
"#,
        );
        let train = read_train_prompts(&path).unwrap();
        assert_eq!(
            train.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["q1", "line-4"]
        );
        assert_eq!(train[0].task_info(Split::Train).split, Split::Train);
        assert_eq!(train[0].kind, "single_hop");
        assert_eq!(train[0].tools, ["catalog"]);
        assert_eq!(train[1].kind, "");
        let eval = read_eval_items(&path, 10).unwrap();
        assert_eq!(
            eval.iter().map(|e| e.question.as_str()).collect::<Vec<_>>(),
            ["B?", "C?"]
        );
        assert_eq!(read_eval_items(&path, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_kind_curriculum_keeps_only_those_kinds_and_refuses_an_empty_choice() {
        let question = |id: &str, kind: &str| Question {
            id: id.into(),
            question: format!("{id}?"),
            answers: vec!["a".into()],
            kind: kind.into(),
            tools: Vec::new(),
            solution: Vec::new(),
        };
        let prompts = vec![
            question("q1", "single_hop"),
            question("q2", "multi_hop"),
            question("q3", "single_hop"),
        ];
        let all = of_kinds(prompts.clone(), &[]).unwrap();
        assert_eq!(all, prompts);
        let single = of_kinds(prompts.clone(), &["single_hop".into()]).unwrap();
        assert_eq!(
            single.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(),
            ["q1", "q3"]
        );
        let err = of_kinds(prompts, &["inventory".into()]).unwrap_err();
        assert!(err.to_string().contains("inventory"), "{err}");
        assert!(
            of_kinds(Vec::new(), &["inventory".into()])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_question_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "{\"question\":\"A?\",\"answers\":[\"a\"]}\nnot json\n",
        );
        let err = read_train_prompts(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let path = write(dir.path(), "{\"question\":\" \",\"answers\":[\"a\"]}\n");
        assert!(
            read_eval_items(&path, 3)
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        let path = write(
            dir.path(),
            "{\"question\":\"A?\",\"answers\":[\"a\"],\"split\":\"heldout\"}\n",
        );
        assert!(read_train_prompts(&path).is_err());
        assert!(read_train_prompts(&dir.path().join("missing.jsonl")).is_err());
    }

    #[test]
    fn a_limited_eval_set_takes_every_kind_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let line = |id: &str, kind: &str| {
            format!(
                r#"{{"id":"{id}","question":"q {id}","answers":["a"],"kind":"{kind}","split":"heldout"}}"#
            )
        };
        let text = [
            line("s1", "single_hop"),
            line("s2", "single_hop"),
            line("s3", "single_hop"),
            line("m1", "multi_hop"),
            line("m2", "multi_hop"),
            line("t1", "stock"),
        ]
        .join("\n");
        let path = write(dir.path(), &text);
        let ids = |limit| -> Vec<String> {
            read_eval_items(&path, limit)
                .unwrap()
                .into_iter()
                .map(|q| q.id)
                .collect()
        };
        assert_eq!(ids(3), ["s1", "m1", "t1"]);
        assert_eq!(ids(5), ["s1", "m1", "t1", "s2", "m2"]);
        assert_eq!(ids(100), ["s1", "m1", "t1", "s2", "m2", "s3"]);
    }

    #[test]
    fn rounds_walk_through_every_prompt_before_repeating() {
        let prompts: Vec<Question> = (0..10)
            .map(|i| Question {
                id: format!("q{i}"),
                question: format!("{i}?"),
                answers: vec![i.to_string()],
                kind: String::new(),
                tools: Vec::new(),
                solution: Vec::new(),
            })
            .collect();
        let mut seen = HashSet::new();
        for round in 0..5 {
            for p in pick_prompts(&prompts, 2, round, 3) {
                assert!(seen.insert(p.id), "a prompt repeated within the first pass");
            }
        }
        assert_eq!(seen.len(), 10);
        assert_eq!(
            pick_prompts(&prompts, 4, 7, 1),
            pick_prompts(&prompts, 4, 7, 1)
        );
        assert_ne!(
            pick_prompts(&prompts, 4, 0, 1),
            pick_prompts(&prompts, 4, 1, 1)
        );
        assert_eq!(pick_prompts(&prompts, 50, 0, 0).len(), 10);
        assert!(pick_prompts(&[], 3, 0, 0).is_empty());
    }
}
