//! Tests of what an edit does to a paper: rights, limits, versions, the horizon, resuming.

use super::*;

const LIMITS: PaperLimits = PaperLimits {
    max_notes: 2,
    max_members: 2,
    max_note_bytes: 100,
    max_tombstones: 3,
    tombstone_retention: 3_600_000 << 10,
};

fn paper() -> (Paper, VersionClock) {
    let mut clock = VersionClock::default();
    (Paper::new(Arc::from("p1"), StoredPaper::default(), &mut clock), clock)
}

fn user(name: &str) -> Arc<str> {
    Arc::from(name)
}

#[test]
fn upsert_creates_then_replaces_keeping_the_author() {
    let (mut p, mut clock) = paper();
    let e1 = p.prepare_upsert("n1", "{}".into(), (&user("u1"), Role::Owner), &mut clock, &LIMITS).unwrap();
    assert!(p.apply(e1.clone()));
    let e2 = p.prepare_upsert("n1", r#"{"a":1}"#.into(), (&user("u2"), Role::Owner), &mut clock, &LIMITS).unwrap();
    assert_eq!(&*e2.note.author, "u1");
    assert!(e2.note.v > e1.note.v);
    assert!(p.apply(e2));
    assert_eq!(p.note("n1").unwrap().data.as_deref(), Some(r#"{"a":1}"#));
    assert_eq!(p.live_count(), 1);
}

#[test]
fn older_versions_never_win() {
    let (mut p, mut clock) = paper();
    let old = p.prepare_upsert("n1", "{}".into(), (&user("u1"), Role::Owner), &mut clock, &LIMITS).unwrap();
    let new = p.prepare_upsert("n1", r#"{"x":2}"#.into(), (&user("u1"), Role::Owner), &mut clock, &LIMITS).unwrap();
    assert!(p.apply(new.clone()));
    assert!(!p.apply(old));
    assert!(!p.apply(new), "the same version twice is not a change");
    assert_eq!(p.note("n1").unwrap().data.as_deref(), Some(r#"{"x":2}"#));
}

#[test]
fn delete_leaves_a_tombstone_that_outranks_older_writes() {
    let (mut p, mut clock) = paper();
    let create = p.prepare_upsert("n1", "{}".into(), (&user("u1"), Role::Owner), &mut clock, &LIMITS).unwrap();
    p.apply(create.clone());
    let delete = p.prepare_delete("n1", (&user("u1"), Role::Owner), &mut clock).unwrap();
    assert!(p.apply(delete.clone()));
    assert_eq!(p.live_count(), 0);
    assert!(!p.apply(create), "a late, older write cannot resurrect it");
    assert_eq!(p.prepare_delete("n1", (&user("u1"), Role::Owner), &mut clock), Err(ErrorCode::NotFound));
    assert_eq!(p.prepare_delete("nope", (&user("u1"), Role::Owner), &mut clock), Err(ErrorCode::NotFound));
    let again = p.prepare_upsert("n1", "{}".into(), (&user("u2"), Role::Owner), &mut clock, &LIMITS).unwrap();
    assert!(again.note.v > delete.note.v);
    assert_eq!(&*again.note.author, "u2", "a note created again belongs to its new creator");
    assert_eq!(p.live_notes().count(), 0);
    p.apply(again);
    assert_eq!(p.live_notes().count(), 1);
}

#[test]
fn max_notes_counts_live_notes_only() {
    let (mut p, mut clock) = paper();
    for id in ["a", "b"] {
        let e = p.prepare_upsert(id, "{}".into(), (&user("u"), Role::Owner), &mut clock, &LIMITS).unwrap();
        p.apply(e);
    }
    assert_eq!(
        p.prepare_upsert("c", "{}".into(), (&user("u"), Role::Owner), &mut clock, &LIMITS),
        Err(ErrorCode::PaperFull)
    );
    assert!(
        p.prepare_upsert("a", "{}".into(), (&user("u"), Role::Owner), &mut clock, &LIMITS).is_ok(),
        "replacing never hits it"
    );
    let d = p.prepare_delete("a", (&user("u"), Role::Owner), &mut clock).unwrap();
    p.apply(d);
    assert!(p.prepare_upsert("c", "{}".into(), (&user("u"), Role::Owner), &mut clock, &LIMITS).is_ok());
}

#[test]
fn completed_papers_refuse_edits() {
    let (mut p, mut clock) = paper();
    let e = p.prepare_upsert("a", "{}".into(), (&user("u"), Role::Owner), &mut clock, &LIMITS).unwrap();
    p.apply(e);
    p.complete(&user("u")).unwrap();
    assert_eq!(p.complete(&user("u")), Err(ErrorCode::PaperCompleted));
    assert_eq!(
        p.prepare_upsert("a", "{}".into(), (&user("u"), Role::Owner), &mut clock, &LIMITS),
        Err(ErrorCode::PaperCompleted)
    );
    assert_eq!(p.prepare_delete("a", (&user("u"), Role::Owner), &mut clock), Err(ErrorCode::PaperCompleted));
}

#[test]
fn roles_decide_who_may_change_what() {
    let (mut p, mut clock) = paper();
    let (ann, bob) = (user("ann"), user("bob"));
    let viewer = (&ann, Role::Viewer);
    assert_eq!(p.prepare_upsert("n", "{}".into(), viewer, &mut clock, &LIMITS), Err(ErrorCode::Forbidden));
    let e = p.prepare_upsert("n", "{}".into(), (&ann, Role::Writer), &mut clock, &LIMITS).unwrap();
    p.apply(e);
    // A writer edits and deletes only its own notes.
    assert!(p.prepare_upsert("n", "{}".into(), (&ann, Role::Writer), &mut clock, &LIMITS).is_ok());
    let bob_writes = (&bob, Role::Writer);
    assert_eq!(p.prepare_upsert("n", "{}".into(), bob_writes, &mut clock, &LIMITS), Err(ErrorCode::Forbidden));
    assert_eq!(p.prepare_delete("n", bob_writes, &mut clock), Err(ErrorCode::Forbidden));
    assert_eq!(p.prepare_delete("n", viewer, &mut clock), Err(ErrorCode::Forbidden));
    // An owner moderates any note; the author stays.
    let moderated = p.prepare_upsert("n", "{}".into(), (&bob, Role::Owner), &mut clock, &LIMITS).unwrap();
    assert_eq!(&*moderated.note.author, "ann");
    assert!(p.prepare_delete("n", (&bob, Role::Owner), &mut clock).is_ok());
    // Only an owner completes.
    assert_eq!(p.check_complete(Role::Writer), Err(ErrorCode::Forbidden));
    assert_eq!(p.check_complete(Role::Owner), Ok(()));
    p.complete(&bob).unwrap();
    assert_eq!(p.check_complete(Role::Owner), Err(ErrorCode::PaperCompleted));
}

#[test]
fn a_note_at_the_top_of_the_range_refuses_alone() {
    let mut clock = VersionClock::default();
    let top = clock::MAX_VERSION;
    let stored = StoredPaper {
        notes: vec![(
            "n1".into(),
            Note { author: user("u"), data: Some(Arc::from("{}")), v: top, node: user(""), fields: None },
        )],
        ..StoredPaper::default()
    };
    let p = Paper::new(Arc::from("p1"), stored, &mut clock);
    let edit = |id: &str, clock: &mut VersionClock| {
        p.prepare_upsert(id, "{}".into(), (&user("u"), Role::Owner), clock, &LIMITS)
    };
    assert_eq!(edit("n1", &mut clock), Err(ErrorCode::Unavailable));
    assert_eq!(p.prepare_delete("n1", (&user("u"), Role::Owner), &mut clock), Err(ErrorCode::Unavailable));
    let other = edit("n2", &mut clock).unwrap();
    assert!(other.note.v < top / 2, "another note keeps normal versions: {}", other.note.v);
}

#[test]
fn the_horizon_bounds_tombstones_and_refuses_writes_below_it() {
    let (mut p, mut clock) = paper();
    let owner = (&user("u"), Role::Owner);
    let mut deleted = Vec::new();
    for i in 0..10 {
        let id = format!("n{i}");
        p.apply(p.prepare_upsert(&id, "{}".into(), owner, &mut clock, &LIMITS).unwrap());
        let d = p.prepare_delete(&id, owner, &mut clock).unwrap();
        deleted.push(d.clone());
        p.apply(d);
        p.prune(0, &LIMITS);
    }
    assert_eq!(p.tombstone_count(), 3, "the cap");
    assert_eq!(p.horizon, deleted[6].note.v, "the greatest dropped version");
    assert!(p.note("n0").is_none());
    let mut late = deleted[0].clone();
    late.note.data = Some(Arc::from("{}"));
    assert!(!p.apply(late), "a write below the horizon to a note not there");
    let again = p.prepare_upsert("n0", "{}".into(), owner, &mut clock, &LIMITS).unwrap();
    assert!(again.note.v > p.horizon && p.apply(again), "created again above it");
    // Retention: everything deleted before the cutoff goes.
    let far_future_ms = u64::MAX >> 12;
    p.prune(far_future_ms, &LIMITS);
    assert_eq!(p.tombstone_count(), 0);
}

#[test]
fn resuming_lists_what_changed_or_asks_for_everything() {
    let (mut p, mut clock) = paper();
    let owner = (&user("u"), Role::Owner);
    let limits = PaperLimits { max_notes: 100, ..LIMITS };
    let first = p.prepare_upsert("a", "{}".into(), owner, &mut clock, &limits).unwrap();
    p.apply(first.clone());
    let b = p.prepare_upsert("b", "{}".into(), owner, &mut clock, &limits).unwrap();
    p.apply(b.clone());
    let del = p.prepare_delete("a", owner, &mut clock).unwrap();
    p.apply(del.clone());
    match p.resume(b.note.v) {
        Resume::Since(_, changed) => {
            let ids: Vec<&str> = changed.iter().map(|c| c.id).collect();
            assert!(ids.contains(&"a") && ids.contains(&"b"), "within the window: {ids:?}");
            assert!(changed.iter().any(|c| c.id == "a" && c.note.data.is_none()), "the delete");
        }
        Resume::Full => panic!("a recent version resumes"),
    }
    // A change arriving far below what was applied raises the floor.
    let late = Edit {
        id: Arc::from("c"),
        note: Note { author: user("u"), data: Some(Arc::from("{}")), v: 5, node: user(""), fields: None },
    };
    assert!(p.apply(late));
    assert!(matches!(p.resume(del.note.v), Resume::Full));
}

#[test]
fn members_come_and_go() {
    let (mut p, _) = paper();
    let m = |key| Member { id: user("c"), user: user("u"), name: user("n"), key };
    p.add_member(m(1));
    p.add_member(m(2));
    assert!(p.empty_since.is_none());
    assert!(p.is_full_of_members(&LIMITS));
    assert_eq!(p.remove_member(1).unwrap().key, 1);
    assert!(p.remove_member(1).is_none());
    p.remove_member(2);
    assert!(p.empty_since.is_some());
}

#[test]
fn the_encoded_body_is_forgotten_at_any_change_and_never_kept() {
    let in_flight = Arc::new(crate::shared::InFlight::new(usize::MAX));
    let (mut p, mut clock) = paper();
    let body = || crate::shared::Shared::new(b"body".to_vec(), &Arc::new(crate::shared::InFlight::new(usize::MAX)));
    let held = crate::shared::Shared::new(b"body".to_vec(), &in_flight);
    p.remember_body(&held);
    assert!(p.shared_body().is_some(), "shared while a connection holds it");
    drop(held);
    assert!(p.shared_body().is_none(), "the paper never keeps it");
    assert_eq!(in_flight.used(), 0);

    // Every change of what snapshots say makes it stale.
    type Change = Box<dyn Fn(&mut Paper, &mut VersionClock)>;
    let changes: Vec<Change> = vec![
        Box::new(|p, clock| {
            let e = p.prepare_upsert("n1", "{}".into(), (&user("u1"), Role::Owner), clock, &LIMITS).unwrap();
            assert!(p.apply(e));
        }),
        Box::new(|p, clock| {
            let cover = p.prepare_cover(r#"{"title":"t"}"#.into(), Role::Owner, clock).unwrap();
            assert!(p.apply_cover(cover));
        }),
        Box::new(|p, clock| {
            let d = p.prepare_delete("n1", (&user("u1"), Role::Owner), clock).unwrap();
            assert!(p.apply(d));
        }),
        Box::new(|p, _| p.complete(&user("u1")).unwrap()),
    ];
    for (i, change) in changes.iter().enumerate() {
        let held = body();
        p.remember_body(&held);
        change(&mut p, &mut clock);
        assert!(p.shared_body().is_none(), "change {i} left the old body in place");
    }
}
