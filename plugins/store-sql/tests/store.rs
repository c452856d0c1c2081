//! The store's behaviour, each test run on SQLite and on PostgreSQL: exact round trips, refused
//! input, damaged rows, the feedback ledger, the trainer's group stream and its cursor, listings,
//! statistics, the export, the adapter registry and retention.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use common::sample::{self, Shape};
use futures::StreamExt;
use searchloop_core::{
    EpisodeEnd, RewardPolicy, SegmentKind, Split, Trajectory, TrajectorySink, reward::source,
};
use searchloop_store_sql::{
    AdapterFiles, AdapterStatus, Cursor, ExportRecord, FeedbackInput, FeedbackOutcome, GroupQuery,
    GroupStream, InsertOutcome, NewAdapter, Page, PromotionAction, Store, StoreError, StoreOptions,
    TrajectoryFilter, TrajectoryGroup,
};

fn grouped(group: &str) -> Shape {
    Shape {
        group_id: Some(group.into()),
        ..Shape::default()
    }
}

fn small(shape: Shape) -> Shape {
    Shape {
        tokens: 20..60,
        ..shape
    }
}

async fn drain(store: &Store, query: GroupQuery) -> (Vec<TrajectoryGroup>, Cursor) {
    let mut stream: GroupStream = store.rewarded_groups(query).await.unwrap();
    let mut groups = Vec::new();
    while let Some(group) = stream.next().await {
        groups.push(group.unwrap());
    }
    (groups, stream.next_cursor())
}

fn since(cursor: Cursor) -> GroupQuery {
    GroupQuery {
        since: cursor,
        ..GroupQuery::default()
    }
}

fn member_ids(group: &TrajectoryGroup) -> Vec<String> {
    group
        .members
        .iter()
        .map(|m| m.trajectory.id.clone())
        .collect()
}

fn adapter(hash: &str, parent: Option<u64>) -> NewAdapter {
    NewAdapter {
        content_hash: hash.into(),
        parent_version: parent,
        path: format!("adapters/{hash}.safetensors"),
        training_config: serde_json::json!({"lr": 1e-5, "sapo_w": 0.1}),
        metrics_summary: serde_json::json!({"reward_mean": 0.42}),
        created_at: None,
    }
}

fn old() -> DateTime<Utc> {
    DateTime::from_timestamp(1_600_000_000, 0).unwrap()
}

on_both_backends! {
    async fn round_trip_is_bit_exact(db, store) {
        let mut t = sample::trajectory("rt-1", &Shape {
            task: Some(("task-1".into(), Split::Heldout, "single_hop".into())),
            group_id: Some("group-1".into()),
            adapter_version: Some(7),
            ..Shape::default()
        });
        // Edge values: the largest token id, a negative zero, a subnormal and the most negative
        // finite log-prob on model tokens, awkward floats in the tool arguments.
        t.tokens[0] = u32::MAX;
        let model: Vec<usize> = t.loss_mask().iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| i).collect();
        t.logprobs[model[0]] = -0.0;
        t.logprobs[model[1]] = -1e-45;
        t.logprobs[model[2]] = f32::MIN;
        t.tool_calls[0].arguments = serde_json::json!({
            "sum": 0.1 + 0.2, "big": 1.7976931348623157e308, "tiny": 5e-324, "text": "ü \"q\" \u{1F600}"
        });
        t.tool_calls[0].latency_ms = 0.1 + 0.7;
        t.created_at = DateTime::from_timestamp(1_780_000_000, 987_654_321).unwrap();
        assert_eq!(store.insert_trajectory(&t).await.unwrap(), InsertOutcome::Inserted);
        let back = store.get_trajectory("rt-1").await.unwrap().unwrap();
        assert_eq!(back, t);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.logprobs), bits(&t.logprobs));
        assert_eq!(back.tool_calls[0].latency_ms.to_bits(), t.tool_calls[0].latency_ms.to_bits());
        assert_eq!(back.timing.model_ms.to_bits(), t.timing.model_ms.to_bits());
        assert_eq!(back.sampling.temperature.to_bits(), t.sampling.temperature.to_bits());

        // The plainest trajectory: no task, group, rewards, answer or tool calls.
        let mut bare = sample::trajectory("rt-2", &small(Shape { rewarded: false, ..Shape::default() }));
        bare.answer = None;
        bare.tool_calls.clear();
        bare.end = EpisodeEnd::TokenLimit;
        bare.timing.started_at = None;
        bare.sampling.seed = None;
        store.insert_trajectory(&bare).await.unwrap();
        assert_eq!(store.get_trajectory("rt-2").await.unwrap().unwrap(), bare);
        assert_eq!(store.get_trajectory("missing").await.unwrap(), None);
    }

    async fn retried_inserts_are_noops_and_conflicts_are_refused(db, store) {
        let t = sample::trajectory("dup-1", &grouped("g"));
        assert_eq!(store.insert_trajectory(&t).await.unwrap(), InsertOutcome::Inserted);
        assert_eq!(store.insert_trajectory(&t).await.unwrap(), InsertOutcome::AlreadyStored);
        store.add_feedback("dup-1", FeedbackInput::new("purchase", 1.0)).await.unwrap();
        // The ledger grew by feedback since; a retry of the original write is still a no-op.
        assert_eq!(store.insert_trajectory(&t).await.unwrap(), InsertOutcome::AlreadyStored);
        let changed = Trajectory { answer: Some("something else".into()), ..t.clone() };
        assert!(matches!(
            store.insert_trajectory(&changed).await,
            Err(StoreError::TrajectoryConflict(id)) if id == "dup-1"
        ));
        // A batch is all or nothing.
        let fresh = sample::trajectory("dup-2", &grouped("g"));
        assert!(store.insert_trajectories(&[fresh, changed]).await.is_err());
        assert_eq!(store.get_trajectory("dup-2").await.unwrap(), None);
        assert_eq!(store.stats().await.unwrap().trajectories, 1);
        assert_eq!(store.get_trajectory("dup-1").await.unwrap().unwrap().rewards.len(), 4);
    }

    async fn invalid_trajectories_are_refused_and_nothing_is_stored(db, store) {
        let good = sample::trajectory("bad", &small(Shape::default()));
        let model = good.loss_mask().iter().position(|m| *m).unwrap();
        let mut cases: Vec<(&str, Trajectory)> = Vec::new();
        let mut t = good.clone();
        t.logprobs[model] = f32::NAN;
        cases.push(("NaN log-prob", t));
        let mut t = good.clone();
        t.segments[1].start += 1;
        cases.push(("gap between segments", t));
        let mut t = good.clone();
        t.id = String::new();
        cases.push(("empty id", t));
        let mut t = good.clone();
        t.rewards[1].idempotency_key = t.rewards[2].idempotency_key.clone();
        cases.push(("repeated idempotency key", t));
        let mut t = good.clone();
        t.timing.total_ms = f64::INFINITY;
        cases.push(("infinite timing", t));
        let mut t = good.clone();
        t.question = "nul \0 inside".into();
        cases.push(("NUL in text", t));
        let mut t = good.clone();
        t.rewards[0].value = f64::NAN;
        cases.push(("NaN reward", t));
        let mut t = good.clone();
        t.sampling.top_p = 0.0;
        cases.push(("bad sampling parameters", t));
        for (what, t) in cases {
            let err = store.insert_trajectory(&t).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidTrajectory(_)), "{what}: {err}");
        }
        assert_eq!(store.stats().await.unwrap().trajectories, 0);
    }

    async fn damaged_rows_are_reported_not_panicked(db, store) {
        for id in ["ok", "short-tokens", "swapped-blobs", "bad-end", "bad-json"] {
            store.insert_trajectory(&sample::trajectory(id, &small(Shape::default()))).await.unwrap();
        }
        db.execute(
            "UPDATE trajectories SET tokens = substr(tokens, 1, 5) WHERE id = 'short-tokens'; \
             UPDATE trajectories SET logprobs = tokens WHERE id = 'swapped-blobs'; \
             UPDATE trajectories SET episode_end = 'exploded' WHERE id = 'bad-end'; \
             UPDATE trajectories SET tool_calls = 'not json' WHERE id = 'bad-json';",
        ).await;
        for (id, expected) in [
            ("short-tokens", "5 bytes"),
            ("swapped-blobs", "log-prob"),
            ("bad-end", "exploded"),
            ("bad-json", "tool_calls"),
        ] {
            match store.get_trajectory(id).await {
                Err(StoreError::CorruptRecord { id: bad, detail }) => {
                    assert_eq!(bad, id);
                    assert!(detail.contains(expected), "{id}: {detail}");
                }
                other => panic!("{id}: expected a corrupt-record error, got {other:?}"),
            }
        }
        assert!(store.get_trajectory("ok").await.unwrap().is_some());
        let mut out = Vec::new();
        assert!(matches!(
            store.export_jsonl(&mut out, &TrajectoryFilter::default()).await,
            Err(StoreError::CorruptRecord { .. })
        ));
    }

    async fn feedback_is_validated_idempotent_and_ledgered(db, store) {
        store.insert_trajectory(&sample::trajectory("fb", &small(Shape::default()))).await.unwrap();
        assert!(matches!(
            store.add_feedback("nope", FeedbackInput::new("purchase", 1.0)).await,
            Err(StoreError::UnknownTrajectory(id)) if id == "nope"
        ));
        let refused = [
            FeedbackInput::new("purchase", f64::NAN),
            FeedbackInput::new("purchase", f64::INFINITY),
            FeedbackInput::new("purchase", f64::NEG_INFINITY),
            FeedbackInput::new("purchase", 1.5),
            FeedbackInput::new("purchase", -1.0001),
            FeedbackInput { weight: f64::NAN, ..FeedbackInput::new("purchase", 1.0) },
            FeedbackInput::new("bad source", 1.0),
            FeedbackInput::new("purchase", 1.0).with_key(""),
        ];
        for input in refused {
            let err = store.add_feedback("fb", input.clone()).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidFeedback { .. }), "{input:?}: {err}");
        }
        let err = store.add_feedback("fb", FeedbackInput::new("purchase", 1.5)).await.unwrap_err();
        assert!(err.to_string().contains("outside the allowed range [-1, 1]"), "{err}");

        let keyed = FeedbackInput::new("purchase", 1.0).with_key("order-17");
        assert_eq!(store.add_feedback("fb", keyed.clone()).await.unwrap(), FeedbackOutcome::Recorded);
        assert_eq!(store.add_feedback("fb", keyed.clone()).await.unwrap(), FeedbackOutcome::Duplicate);
        assert!(matches!(
            store.add_feedback("fb", FeedbackInput { value: 0.0, ..keyed }).await,
            Err(StoreError::IdempotencyConflict { key, .. }) if key == "order-17"
        ));
        // Without a key every delivery counts.
        for _ in 0..2 {
            assert_eq!(
                store.add_feedback("fb", FeedbackInput::new("thumbs", -1.0)).await.unwrap(),
                FeedbackOutcome::Recorded
            );
        }
        let wide = store.with_options(StoreOptions { feedback_range: 0.0..=5.0, ..StoreOptions::default() }).unwrap();
        assert_eq!(wide.add_feedback("fb", FeedbackInput::new("stars", 4.0)).await.unwrap(), FeedbackOutcome::Recorded);

        let t = store.get_trajectory("fb").await.unwrap().unwrap();
        let sources: Vec<&str> = t.rewards.iter().map(|r| r.source.as_str()).collect();
        assert_eq!(sources, ["exact_match", "f1", "format", "purchase", "thumbs", "thumbs", "stars"]);
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.reward_entries, stats.feedback_entries), (7, 4));
        let counts = store.reward_counts_by_source().await.unwrap();
        let thumbs = counts.iter().find(|c| c.source == "thumbs").unwrap();
        assert_eq!((thumbs.entries, thumbs.feedback_entries, thumbs.trajectories), (2, 2, 1));
        assert_eq!(thumbs.mean_value, -1.0);
        let f1 = counts.iter().find(|c| c.source == source::F1).unwrap();
        assert_eq!((f1.entries, f1.feedback_entries), (1, 0));
    }

    async fn rewarded_groups_follow_the_cursor(db, store) {
        let g1: Vec<Trajectory> = (0..3).map(|i| sample::trajectory(&format!("g1-{i}"), &small(grouped("g1")))).collect();
        store.insert_trajectories(&g1).await.unwrap();
        store.insert_trajectory(&sample::trajectory("g2-0", &small(grouped("g2")))).await.unwrap();
        store.insert_trajectory(&sample::trajectory("g2-1", &small(Shape { rewarded: false, ..grouped("g2") }))).await.unwrap();
        store.insert_trajectory(&sample::trajectory("alone", &small(Shape::default()))).await.unwrap();
        store.insert_trajectory(&sample::trajectory("unrewarded", &small(Shape { rewarded: false, ..Shape::default() }))).await.unwrap();

        // Groups numbered in one sequencing round come in no particular order.
        let by_id = |groups: &[TrajectoryGroup]| {
            let mut got: Vec<(Option<String>, Vec<String>)> = groups.iter().map(|g| (g.group_id.clone(), member_ids(g))).collect();
            got.sort();
            got
        };
        let (groups, c1) = drain(&store, since(Cursor::START)).await;
        let got = by_id(&groups);
        assert_eq!(got, vec![
            (None, vec!["alone".into()]),
            (Some("g1".into()), vec!["g1-0".into(), "g1-1".into(), "g1-2".into()]),
            (Some("g2".into()), vec!["g2-0".into()]),
        ]);
        for m in groups.iter().flat_map(|g| &g.members) {
            assert_eq!(Some(m.reward), RewardPolicy::default().combine(&m.trajectory.rewards));
        }
        assert!(groups.windows(2).all(|w| w[0].cursor < w[1].cursor));
        assert!(groups.iter().all(|g| g.cursor <= c1));
        assert!(drain(&store, since(c1)).await.0.is_empty());

        // Late feedback brings its group back, with the new member and the new reward.
        store.add_feedback("g2-1", FeedbackInput::new("purchase", 1.0)).await.unwrap();
        store.add_feedback("g1-0", FeedbackInput::new("purchase", 1.0)).await.unwrap();
        let (groups, c2) = drain(&store, since(c1)).await;
        assert_eq!(by_id(&groups), vec![
            (Some("g1".into()), vec!["g1-0".into(), "g1-1".into(), "g1-2".into()]),
            (Some("g2".into()), vec!["g2-0".into(), "g2-1".into()]),
        ]);
        let before = RewardPolicy::default().combine(&g1[0].rewards).unwrap();
        let g1_again = groups.iter().find(|g| g.group_id.as_deref() == Some("g1")).unwrap();
        assert_eq!(g1_again.members[0].reward, before + 1.0);
        assert!(c2 > c1 && drain(&store, since(c2)).await.0.is_empty());
        // The cursor survives printing and parsing.
        assert_eq!(c2.to_string().parse::<Cursor>().unwrap(), c2);
        assert!("x".parse::<Cursor>().is_err());
        assert!("-1".parse::<Cursor>().is_err());

        // min_group_size, and limit with resumption.
        let big = GroupQuery { min_group_size: 3, ..since(Cursor::START) };
        assert_eq!(drain(&store, big).await.0.len(), 1);
        let mut first = store.rewarded_groups(GroupQuery { limit: Some(1), ..since(Cursor::START) }).await.unwrap();
        let one = first.next().await.unwrap().unwrap();
        assert!(first.next().await.is_none());
        assert_eq!(first.next_cursor(), one.cursor);
        let (rest, end) = drain(&store, since(first.next_cursor())).await;
        assert_eq!(rest.len(), 2);
        assert!(end >= c2);
    }

    async fn group_filters_select_members(db, store) {
        let now = Utc::now();
        let recent = |shape: Shape| small(Shape { created_at: now, ..shape });
        store.insert_trajectories(&[
            sample::trajectory("base-0", &recent(grouped("base"))),
            sample::trajectory("base-old", &small(Shape { created_at: old(), ..grouped("base") })),
            sample::trajectory("v2-0", &recent(Shape { adapter_version: Some(2), ..grouped("v2") })),
            sample::trajectory("v2-1", &recent(Shape { adapter_version: Some(2), ..grouped("v2") })),
            sample::trajectory("held-0", &recent(Shape {
                task: Some(("q1".into(), Split::Heldout, "inventory".into())),
                ..grouped("held")
            })),
            sample::trajectory("train-0", &recent(Shape {
                task: Some(("q2".into(), Split::Train, "single_hop".into())),
                ..grouped("train")
            })),
        ]).await.unwrap();
        let ids = |groups: Vec<TrajectoryGroup>| {
            let mut ids: Vec<String> = groups.iter().flat_map(member_ids).collect();
            ids.sort();
            ids
        };
        let query = |filter: TrajectoryFilter| GroupQuery { filter, ..since(Cursor::START) };
        let v2 = query(TrajectoryFilter { adapter_version: Some(Some(2)), ..TrajectoryFilter::default() });
        assert_eq!(ids(drain(&store, v2).await.0), ["v2-0", "v2-1"]);
        let base = query(TrajectoryFilter { adapter_version: Some(None), ..TrajectoryFilter::default() });
        assert_eq!(ids(drain(&store, base).await.0), ["base-0", "base-old", "held-0", "train-0"]);
        let held = query(TrajectoryFilter { split: Some(Split::Heldout), ..TrajectoryFilter::default() });
        assert_eq!(ids(drain(&store, held).await.0), ["held-0"]);
        let kind = query(TrajectoryFilter { task_kind: Some("single_hop".into()), ..TrajectoryFilter::default() });
        assert_eq!(ids(drain(&store, kind).await.0), ["train-0"]);
        let young = GroupQuery { max_age: Some(Duration::from_secs(3600)), ..since(Cursor::START) };
        let young_ids = ids(drain(&store, young).await.0);
        assert!(young_ids.contains(&"base-0".to_string()) && !young_ids.contains(&"base-old".to_string()));
        assert_eq!(young_ids.len(), 5);
    }

    async fn many_groups_stream_page_by_page(db, store) {
        for batch in 0..10 {
            let ts: Vec<Trajectory> = (0..15).flat_map(|g| {
                let group = format!("p{batch}-{g}");
                (0..2).map(move |m| sample::trajectory(&format!("{group}-{m}"), &small(grouped(&group))))
            }).collect();
            store.insert_trajectories(&ts).await.unwrap();
        }
        let (all, end) = drain(&store, since(Cursor::START)).await;
        assert_eq!(all.len(), 150);
        assert!(all.iter().all(|g| g.members.len() == 2));
        let mut seen: Vec<String> = all.iter().flat_map(member_ids).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 300);
        // Reading in two limited passes gives the same groups.
        let mut first = store.rewarded_groups(GroupQuery { limit: Some(100), ..since(Cursor::START) }).await.unwrap();
        let mut n = 0;
        while let Some(g) = first.next().await {
            g.unwrap();
            n += 1;
        }
        assert_eq!(n, 100);
        let (rest, end2) = drain(&store, since(first.next_cursor())).await;
        assert_eq!(rest.len(), 50);
        assert_eq!(rest[0].cursor, all[100].cursor);
        assert!(end2 >= end);
    }

    async fn heldout_items_and_statistics(db, store) {
        let task = |id: &str, split| Some((id.to_string(), split, "inventory".to_string()));
        store.insert_trajectories(&[
            sample::trajectory("h1-a", &small(Shape { task: task("h1", Split::Heldout), adapter_version: Some(1), ..grouped("x") })),
            sample::trajectory("h1-b", &small(Shape { task: task("h1", Split::Heldout), adapter_version: Some(1), ..grouped("x") })),
            sample::trajectory("h2-a", &small(Shape { task: task("h2", Split::Heldout), ..Shape::default() })),
            sample::trajectory("t1-a", &small(Shape { task: task("t1", Split::Train), ..Shape::default() })),
            sample::trajectory("t1-b", &small(Shape { task: task("t1", Split::Train), rewarded: false, ..Shape::default() })),
            sample::trajectory("free", &small(Shape::default())),
        ]).await.unwrap();
        let first = store.heldout_items(&Page::first(1)).await.unwrap();
        assert_eq!(first.items.len(), 1);
        assert_eq!(first.items[0].task_id, "h1");
        assert_eq!(first.items[0].trajectories, 2);
        let h1 = store.get_trajectory("h1-a").await.unwrap().unwrap();
        assert_eq!(first.items[0].question, h1.question);
        assert_eq!(first.items[0].gold_answers, h1.task.unwrap().gold_answers);
        let second = store.heldout_items(&Page { after: first.next, limit: 1 }).await.unwrap();
        assert_eq!(second.items.iter().map(|i| i.task_id.as_str()).collect::<Vec<_>>(), ["h2"]);
        let third = store.heldout_items(&Page { after: second.next, limit: 1 }).await.unwrap();
        assert!(third.items.is_empty() && third.next.is_none());

        let stats = store.stats().await.unwrap();
        assert_eq!(stats.trajectories, 6);
        assert_eq!(stats.rewarded_trajectories, 5);
        assert_eq!(stats.groups, 4, "x, and three ungrouped rewarded trajectories");
        assert_eq!(stats.reward_entries, 15);
        assert_eq!(stats.feedback_entries, 0);
        let versions: Vec<(Option<u64>, u64)> = stats.by_adapter_version.iter().map(|c| (c.adapter_version, c.trajectories)).collect();
        assert_eq!(versions, [(None, 4), (Some(1), 2)]);
        let splits: Vec<(Option<Split>, u64)> = stats.by_split.iter().map(|c| (c.split, c.trajectories)).collect();
        assert_eq!(splits, [(None, 1), (Some(Split::Heldout), 3), (Some(Split::Train), 2)]);
        assert!(stats.size_bytes > 0);
        assert_eq!(stats.promoted_adapter, None);
        let counts = store.reward_counts_by_source().await.unwrap();
        assert_eq!(counts.iter().map(|c| (c.source.as_str(), c.entries)).collect::<Vec<_>>(),
                   [("exact_match", 5), ("f1", 5), ("format", 5)]);
    }

    async fn listings_page_newest_first(db, store) {
        for i in 0..7 {
            let split = if i % 2 == 0 { Split::Train } else { Split::Heldout };
            store.insert_trajectory(&sample::trajectory(&format!("l{i}"), &small(Shape {
                task: Some((format!("task{i}"), split, "kind".into())),
                ..Shape::default()
            }))).await.unwrap();
        }
        let mut ids = Vec::new();
        let mut page = Page::first(3);
        loop {
            let got = store.list_trajectories(&TrajectoryFilter::default(), &page).await.unwrap();
            for s in &got.items {
                let t = store.get_trajectory(&s.id).await.unwrap().unwrap();
                assert_eq!(s.tokens, t.tokens.len());
                assert_eq!(s.rewards, t.rewards);
                assert_eq!(s.reward, RewardPolicy::default().combine(&t.rewards));
                assert_eq!(s.question, t.question);
            }
            ids.extend(got.items.into_iter().map(|s| s.id));
            match got.next {
                Some(next) => page = Page { after: Some(next), limit: 3 },
                None => break,
            }
        }
        assert_eq!(ids, ["l6", "l5", "l4", "l3", "l2", "l1", "l0"]);
        let held = store.list_trajectories(
            &TrajectoryFilter { split: Some(Split::Heldout), ..TrajectoryFilter::default() },
            &Page::first(10),
        ).await.unwrap();
        assert_eq!(held.items.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["l5", "l3", "l1"]);
        assert!(held.next.is_none());
        let bad = Page { after: Some("not-a-number".parse().unwrap()), limit: 3 };
        assert!(matches!(store.list_trajectories(&TrajectoryFilter::default(), &bad).await, Err(StoreError::InvalidArgument(_))));
        assert!(matches!(store.list_trajectories(&TrajectoryFilter::default(), &Page::first(0)).await, Err(StoreError::InvalidArgument(_))));
    }

    async fn export_is_trainable_jsonl(db, store) {
        let a = sample::trajectory("ex-a", &Shape {
            task: Some(("q".into(), Split::Train, "single_hop".into())),
            adapter_version: Some(3),
            ..grouped("ex")
        });
        let b = sample::trajectory("ex-b", &small(Shape { rewarded: false, ..grouped("ex") }));
        store.insert_trajectories(&[a.clone(), b.clone()]).await.unwrap();
        store.add_feedback("ex-a", FeedbackInput::new("purchase", 1.0)).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(store.export_jsonl(&mut out, &TrajectoryFilter::default()).await.unwrap(), 2);
        let lines: Vec<&str> = std::str::from_utf8(&out).unwrap().lines().collect();
        assert_eq!(lines.len(), 2);
        let json: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        for key in ["id", "prompt", "completion", "prompt_ids", "completion_ids", "completion_mask",
                    "behaviour_logprobs", "reward", "rewards", "group_id", "adapter_version", "task"] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["task"]["split"], "train");
        let rec: ExportRecord = serde_json::from_str(lines[0]).unwrap();
        let a = store.get_trajectory("ex-a").await.unwrap().unwrap();
        let p = a.prompt_len();
        assert_eq!(rec.prompt, a.prompt_text);
        assert_eq!(rec.completion, a.response_text);
        assert_eq!([rec.prompt_ids.clone(), rec.completion_ids.clone()].concat(), a.tokens);
        let mask: Vec<u8> = a.loss_mask()[p..].iter().map(|m| u8::from(*m)).collect();
        assert_eq!(rec.completion_mask, mask);
        assert!(rec.completion_mask.contains(&0) && rec.completion_mask.contains(&1));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&rec.behaviour_logprobs), bits(&a.logprobs[p..]));
        assert_eq!(rec.reward, RewardPolicy::default().combine(&a.rewards));
        assert_eq!(rec.rewards.len(), 4);
        assert_eq!(rec.adapter_version, Some(3));
        assert_eq!(rec.group_id.as_deref(), Some("ex"));
        let unrewarded: ExportRecord = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(unrewarded.reward, None);
        assert_eq!(a.segments[0].kind, SegmentKind::Prompt);

        let mut only_rewarded = Vec::new();
        let filter = TrajectoryFilter { rewarded_only: true, ..TrajectoryFilter::default() };
        assert_eq!(store.export_jsonl(&mut only_rewarded, &filter).await.unwrap(), 1);
    }

    async fn adapter_registry_life_cycle(db, store) {
        let v1 = store.register_adapter(adapter("h1", None)).await.unwrap();
        assert_eq!((v1.version, v1.status), (1, AdapterStatus::Candidate));
        assert_eq!(v1.training_config["sapo_w"], 0.1);
        assert!(matches!(store.register_adapter(adapter("hx", Some(99))).await, Err(StoreError::UnknownAdapter(99))));
        let v2 = store.register_adapter(adapter("h2", Some(1))).await.unwrap();
        assert_eq!((v2.version, v2.parent_version), (2, Some(1)));
        let v2 = v2.version;

        assert_eq!(store.promote(1).await.unwrap().status, AdapterStatus::Promoted);
        assert_eq!(store.promote(v2).await.unwrap().status, AdapterStatus::Promoted);
        assert_eq!(store.get_adapter(1).await.unwrap().unwrap().status, AdapterStatus::Superseded);
        assert_eq!(store.promoted().await.unwrap().unwrap().version, v2);
        assert!(matches!(store.reject(v2, "no").await, Err(StoreError::InvalidTransition { from: AdapterStatus::Promoted, .. })));

        let v3 = store.register_adapter(adapter("h3", Some(v2))).await.unwrap().version;
        let rejected = store.reject(v3, "eval regression").await.unwrap();
        assert_eq!((rejected.status, rejected.status_reason.as_deref()), (AdapterStatus::Rejected, Some("eval regression")));
        assert!(matches!(store.promote(v3).await, Err(StoreError::InvalidTransition { from: AdapterStatus::Rejected, .. })));
        assert!(matches!(store.promote(42).await, Err(StoreError::UnknownAdapter(42))));

        // Rollback goes to the previously promoted adapter, then to the base model.
        assert_eq!(store.rollback(None, "reward fell").await.unwrap().unwrap().version, 1);
        assert_eq!(store.get_adapter(v2).await.unwrap().unwrap().status, AdapterStatus::RolledBack);
        assert!(matches!(store.promote(v2).await, Err(StoreError::InvalidTransition { .. })));
        assert_eq!(store.rollback(None, "base is better").await.unwrap(), None);
        assert_eq!(store.promoted().await.unwrap(), None);
        assert!(matches!(store.rollback(None, "again").await, Err(StoreError::NothingPromoted)));

        // An explicit rollback target must be a superseded adapter.
        let v4 = store.register_adapter(adapter("h4", None)).await.unwrap().version;
        let v5 = store.register_adapter(adapter("h5", Some(v4))).await.unwrap().version;
        store.promote(v4).await.unwrap();
        store.promote(v5).await.unwrap();
        assert!(matches!(store.rollback(Some(v3), "x").await, Err(StoreError::InvalidTransition { .. })));
        assert_eq!(store.rollback(Some(v4), "x").await.unwrap().unwrap().version, v4);

        let history: Vec<(Option<u64>, PromotionAction)> = store.promotion_history().await.unwrap()
            .into_iter().map(|e| (e.version, e.action)).collect();
        use PromotionAction::{Promote, Rollback};
        assert_eq!(history, [
            (Some(1), Promote), (Some(v2), Promote), (Some(1), Rollback), (None, Rollback),
            (Some(v4), Promote), (Some(v5), Promote), (Some(v4), Rollback),
        ]);

        store.insert_trajectory(&sample::trajectory("eval-1", &small(Shape::default()))).await.unwrap();
        let results = serde_json::json!({"exact_match": 0.31, "n": 1});
        assert!(matches!(store.set_eval(77, &results, &[]).await, Err(StoreError::UnknownAdapter(77))));
        assert!(matches!(
            store.set_eval(v4, &results, &["eval-1".into(), "ghost".into()]).await,
            Err(StoreError::UnknownTrajectory(id)) if id == "ghost"
        ));
        assert_eq!(store.get_adapter(v4).await.unwrap().unwrap().eval_results, None, "a failed set_eval changes nothing");
        store.set_eval(v4, &results, &["eval-1".into()]).await.unwrap();
        assert_eq!(store.get_adapter(v4).await.unwrap().unwrap().eval_results, Some(results));
        let versions: Vec<u64> = store.list_adapters().await.unwrap().iter().map(|a| a.version).collect();
        assert_eq!(versions, [1, v2, v3, v4, v5]);
        assert_eq!(store.stats().await.unwrap().promoted_adapter, Some(v4));
    }

    async fn concurrent_promotions_leave_exactly_one_promoted(db, store) {
        let mut versions = Vec::new();
        for i in 0..8 {
            versions.push(store.register_adapter(adapter(&format!("c{i}"), None)).await.unwrap().version);
        }
        let tasks: Vec<_> = versions.iter().map(|&v| {
            let store = store.clone();
            tokio::spawn(async move { store.promote(v).await.map(|a| a.version) })
        }).collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let adapters = store.list_adapters().await.unwrap();
        let promoted: Vec<u64> = adapters.iter().filter(|a| a.status == AdapterStatus::Promoted).map(|a| a.version).collect();
        assert_eq!(promoted.len(), 1);
        assert_eq!(adapters.iter().filter(|a| a.status == AdapterStatus::Superseded).count(), 7);
        let history = store.promotion_history().await.unwrap();
        assert_eq!(history.len(), 8);
        assert_eq!(history.last().unwrap().version, Some(promoted[0]));
        // The database itself refuses a second promoted adapter.
        assert!(db.try_execute("UPDATE adapters SET status = 'promoted'").await.is_err());
    }

    async fn retention_keeps_what_a_promoted_adapter_was_evaluated_on(db, store) {
        let olds: Vec<Trajectory> = (0..6).map(|i| sample::trajectory(&format!("old-{i}"), &small(Shape { created_at: old(), ..grouped(&format!("og{i}")) }))).collect();
        let news: Vec<Trajectory> = (0..2).map(|i| sample::trajectory(&format!("new-{i}"), &small(Shape { created_at: Utc::now(), ..Shape::default() }))).collect();
        store.insert_trajectories(&olds).await.unwrap();
        store.insert_trajectories(&news).await.unwrap();
        store.add_feedback("old-3", FeedbackInput::new("purchase", 1.0)).await.unwrap();
        let kept = store.register_adapter(adapter("kept", None)).await.unwrap().version;
        let dropped = store.register_adapter(adapter("dropped", None)).await.unwrap().version;
        store.set_eval(kept, &serde_json::json!({}), &["old-0".into()]).await.unwrap();
        store.set_eval(dropped, &serde_json::json!({}), &["old-1".into()]).await.unwrap();
        store.promote(kept).await.unwrap();
        store.reject(dropped, "worse").await.unwrap();

        let month = Duration::from_secs(30 * 86_400);
        let mut archive = Vec::new();
        assert_eq!(store.archive_older_than(month, &mut archive).await.unwrap(), 5);
        let archived: Vec<Trajectory> = std::str::from_utf8(&archive).unwrap().lines()
            .map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(archived.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["old-1", "old-2", "old-3", "old-4", "old-5"]);
        assert_eq!(archived[0], olds[1]);
        assert_eq!(archived[2].rewards.len(), 4, "the archive keeps the whole ledger");
        assert!(store.get_trajectory("old-0").await.unwrap().is_some());
        assert!(store.get_trajectory("old-3").await.unwrap().is_none());
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.trajectories, stats.groups, stats.reward_entries), (3, 3, 9));
        assert_eq!(stats.feedback_entries, 0);

        // Once the adapter is rolled back, its eval no longer pins anything.
        store.rollback(None, "regression").await.unwrap();
        assert_eq!(store.delete_older_than(month).await.unwrap(), 1);
        assert_eq!(store.delete_older_than(month).await.unwrap(), 0);
        let left: Vec<String> = store.list_trajectories(&TrajectoryFilter::default(), &Page::first(10)).await.unwrap()
            .items.into_iter().map(|s| s.id).collect();
        assert_eq!(left, ["new-1", "new-0"]);
        let (groups, _) = drain(&store, since(Cursor::START)).await;
        assert_eq!(groups.len(), 2);
    }

    async fn sink_writes_survive_a_reopen(db, store) {
        let sink: Arc<dyn TrajectorySink> = Arc::new(store.clone());
        let t = sample::trajectory("sink-1", &grouped("s"));
        sink.record(&t).await.unwrap();
        let mut bad = t.clone();
        bad.id = "sink-2".into();
        bad.logprobs[0] = -1.0;
        let err = sink.record(&bad).await.unwrap_err();
        assert!(matches!(err, searchloop_core::Error::Sink(_)), "{err}");
        store.add_feedback("sink-1", FeedbackInput::new("purchase", 0.5).with_key("k")).await.unwrap();
        let before = store.get_trajectory("sink-1").await.unwrap().unwrap();
        store.close().await;

        let reopened = db.open().await;
        assert_eq!(reopened.get_trajectory("sink-1").await.unwrap().unwrap(), before);
        assert_eq!(reopened.add_feedback("sink-1", FeedbackInput::new("purchase", 0.5).with_key("k")).await.unwrap(), FeedbackOutcome::Duplicate);
        assert_eq!(reopened.stats().await.unwrap().trajectories, 1);
        reopened.check_integrity().await.unwrap();
        reopened.close().await;
    }

    async fn published_adapters_keep_their_files_and_trajectories_their_replica(db, store) {
        let files = AdapterFiles {
            peft_config: "{\"r\": 8}".into(),
            weights: (0..=255u8).cycle().take(70_000).collect(),
        };
        let staged = store.stage_adapter(None).await.unwrap();
        // Weights that do not hash to the adapter's content hash are refused at publication.
        let wrong = store.publish_adapter(staged, adapter("not-the-hash", None), &files, None).await;
        assert!(matches!(wrong, Err(StoreError::InvalidArgument(_))), "{wrong:?}");
        let record = store
            .publish_adapter(staged, adapter(&files.content_hash(), None), &files, None)
            .await
            .unwrap();
        assert_eq!(record.content_hash.len(), 64);
        assert_eq!(store.adapter_files(staged).await.unwrap(), Some(files.clone()));
        // One registered by path alone has none; an unknown version neither.
        let by_path = store.register_adapter(adapter("by-path", None)).await.unwrap();
        assert_eq!(store.adapter_files(by_path.version).await.unwrap(), None);
        assert_eq!(store.adapter_files(999).await.unwrap(), None);
        // Bytes damaged in the database are an error, never handed out.
        db.execute(&format!("UPDATE adapter_files SET peft_config = 'x' WHERE version = {staged}")).await;
        assert!(store.adapter_files(staged).await.is_ok());
        let flip = match &db {
            common::TestDb::Sqlite { .. } => "UPDATE adapter_files SET weights = zeroblob(16)",
            common::TestDb::Postgres { .. } => "UPDATE adapter_files SET weights = '\\x00'::bytea",
        };
        db.execute(flip).await;
        let damaged = store.adapter_files(staged).await;
        assert!(matches!(damaged, Err(StoreError::CorruptRecord { .. })), "{damaged:?}");

        // A trajectory keeps the replica that ran it; the export carries it too.
        let mut t = sample::trajectory("replica-1", &grouped("r"));
        t.replica_id = Some("replica-a:8080".into());
        store.insert_trajectory(&t).await.unwrap();
        let back = store.get_trajectory("replica-1").await.unwrap().unwrap();
        assert_eq!(back.replica_id.as_deref(), Some("replica-a:8080"));
        let mut export = Vec::new();
        store.export_jsonl(&mut export, &TrajectoryFilter::default()).await.unwrap();
        let line: ExportRecord = serde_json::from_slice(export.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(line.replica_id.as_deref(), Some("replica-a:8080"));
        let mut empty = sample::trajectory("replica-2", &grouped("r"));
        empty.replica_id = Some(String::new());
        assert!(matches!(store.insert_trajectory(&empty).await, Err(StoreError::InvalidTrajectory(_))));
    }
}

/// One trainer lease per PostgreSQL schema: a second store's attempt fails while the first
/// holds it, another schema has its own, and a holder that goes away (its session closed, as
/// when its process dies) leaves the lease to the next taker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trainer_lease_per_postgres_schema() {
    let db = common::TestDb::new(common::Kind::Postgres).await;
    let (first, second) = (db.open().await, db.open().await);
    let mut held = first
        .try_trainer_lease()
        .await
        .unwrap()
        .expect("a free lease");
    assert!(held.is_held().await);
    assert!(second.try_trainer_lease().await.unwrap().is_none());
    assert!(
        first.try_trainer_lease().await.unwrap().is_none(),
        "not twice"
    );

    let other_db = common::TestDb::new(common::Kind::Postgres).await;
    let other = other_db.open().await;
    let other_lease = other.try_trainer_lease().await.unwrap();
    assert!(
        other_lease.is_some(),
        "another schema contends with this one"
    );

    // Dropped without a word: the session's end releases the lock on the server.
    drop(held);
    let started = std::time::Instant::now();
    let taken = loop {
        if let Some(lease) = second.try_trainer_lease().await.unwrap() {
            break lease;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the dropped lease was never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(first.try_trainer_lease().await.unwrap().is_none());
    // Released on purpose: free at once.
    taken.release().await.unwrap();
    let again = first.try_trainer_lease().await.unwrap();
    assert!(again.is_some());

    drop((again, other_lease));
    for store in [first, second, other] {
        store.close().await;
    }
    db.cleanup().await;
    other_db.cleanup().await;
}

/// A SQLite store belongs to one process: its lease is always granted.
#[tokio::test]
async fn a_sqlite_store_always_grants_the_trainer_lease() {
    let db = common::TestDb::new(common::Kind::Sqlite).await;
    let store = db.open().await;
    let mut first = store.try_trainer_lease().await.unwrap().unwrap();
    assert!(first.is_held().await);
    assert!(store.try_trainer_lease().await.unwrap().is_some());
    first.release().await.unwrap();
    store.close().await;
    db.cleanup().await;
}
