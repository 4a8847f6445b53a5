//! A paper in memory: its notes with their versions, its members, whether it is
//! completed. Decides what an edit does (PROTOCOL.md sections 2 and 3.3) but
//! never touches a socket: members are known by an opaque key of the event loop.

pub mod clock;
pub mod fields;
pub mod registry;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crate::auth::Role;
use crate::protocol::{ErrorCode, MemberView, NoteView, PaperView};
use crate::shared::{Shared, WeakShared};
pub use clock::VersionClock;

/// A note; `data` is `None` once deleted (a tombstone that keeps its version, so
/// that an older write cannot bring the note back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub author: Arc<str>,
    pub data: Option<Arc<str>>,
    pub v: u64,
    /// The node that wrote this version (breaks ties between nodes).
    pub node: Arc<str>,
    /// Per-field versions, once a patch changed a field after the last upsert.
    pub fields: Option<Arc<crate::protocol::FieldVersions>>,
}

/// A change to one note, decided by a paper and not yet applied: it goes to the
/// store first, and is applied only if the store takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub id: Arc<str>,
    pub note: Note,
}

/// A patch of some fields of one note (1.1), decided and not yet applied.
#[derive(Debug, Clone)]
pub struct Patch {
    pub id: Arc<str>,
    /// The fields it sets, raw JSON; `None` removes one.
    pub fields: fields::PatchFields,
    pub v: u64,
    pub node: Arc<str>,
}

/// A session joined to a paper.
#[derive(Debug, Clone)]
pub struct Member {
    /// The session id, the `you` of its snapshot and the `from` of its messages.
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub name: Arc<str>,
    /// The event loop's key for the session's connection.
    pub key: usize,
}

impl Member {
    pub fn view(&self) -> MemberView<'_> {
        MemberView { id: &self.id, user: &self.user, name: &self.name }
    }
}

/// A member of the paper on another node (`--cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMember {
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub name: Arc<str>,
    pub node: Arc<str>,
}

impl RemoteMember {
    pub fn view(&self) -> MemberView<'_> {
        MemberView { id: &self.id, user: &self.user, name: &self.name }
    }
}

/// What storage holds of a paper, as read when it is loaded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredPaper {
    pub notes: Vec<(String, Note)>,
    /// `Some(by)` once completed.
    pub completed_by: Option<String>,
    /// Members on other live nodes (`--cluster`).
    pub remote_members: Vec<RemoteMember>,
    /// The cover (1.1), as stored.
    pub cover: Option<Cover>,
    /// Tombstones at or below this version were dropped (PROTOCOL.md 4, 1.1).
    pub horizon: u64,
    /// A `since` at or below this gets a full snapshot (PROTOCOL.md 3.1, 1.1).
    pub resume_floor: u64,
    /// Users revoked (1.2, PROTOCOL.md 7) and the unix second each may join again.
    pub revoked: Vec<(String, u64)>,
}

/// The paper's cover (PROTOCOL.md 3.2, 1.1: `meta`): an object, last writer
/// wins by version as for a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cover {
    pub data: Arc<str>,
    pub v: u64,
    pub node: Arc<str>,
}

/// Limits that apply to every paper.
#[derive(Debug, Clone, Copy)]
pub struct PaperLimits {
    pub max_notes: usize,
    pub max_members: usize,
    /// The largest `data` of a note, compact JSON (a patch may not pass it).
    pub max_note_bytes: usize,
    /// Tombstones kept at most, and for how long (in versions: milliseconds x 1024).
    pub max_tombstones: usize,
    pub tombstone_retention: u64,
}

/// How late a change may arrive (in versions: 60 s) and still be found by a
/// client resuming `since` a version it saw (PROTOCOL.md 3.1, 1.1).
pub const RESUME_WINDOW: u64 = 60_000 << 10;

/// What a resuming client is sent.
pub enum Resume<'a> {
    /// Every note that may have changed after `since`, deleted ones included.
    Since(u64, Vec<NoteChange<'a>>),
    /// The paper whole: the client's version is below the horizon or the floor.
    Full,
}

/// A note as a `since` snapshot lists it: live, or deleted.
pub struct NoteChange<'a> {
    pub id: &'a str,
    pub note: &'a Note,
}

#[derive(Debug)]
pub struct Paper {
    pub id: Arc<str>,
    notes: HashMap<Arc<str>, Note>,
    /// Notes that are not deleted; `max_notes` counts these.
    live: usize,
    completed_by: Option<Arc<str>>,
    members: Vec<Member>,
    /// Members on other nodes, for snapshots (`--cluster`).
    remote: Vec<RemoteMember>,
    /// Edits handed to the store and not yet confirmed written. While any are,
    /// the paper stays in memory: reading it back from storage would miss them.
    pub unwritten: usize,
    /// Notes with such edits of this node, and how many: this node's view of
    /// them may be ahead of Redis's (a delete whose tombstone it dropped already).
    unwritten_notes: HashMap<Arc<str>, u32>,
    /// When the last member left; the registry drops the paper some time after.
    pub empty_since: Option<Instant>,
    /// Where the paper stands with Redis.
    pub health: Health,
    /// Tombstones by version, oldest first: the ones the horizon drops first.
    tombstones: BTreeSet<(u64, Arc<str>)>,
    /// Tombstones at or below this version were dropped: a write at or below it
    /// to a note that is not there is never applied.
    pub horizon: u64,
    /// The greatest version applied here, and the floor a late change raised.
    max_applied: u64,
    pub resume_floor: u64,
    /// The floor rose here since last asked: the other nodes must hear it.
    floor_raised: bool,
    cover: Option<Cover>,
    /// The encoded body of this version (`protocol::frame::paper_body`), while
    /// some connection still writes it; any change forgets it.
    body: WeakShared,
    /// Users revoked (PROTOCOL.md 7, 1.2): the unix second each may join again.
    revoked: HashMap<Arc<str>, u64>,
}

/// Whether a paper takes edits, as far as Redis is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Writable,
    /// Its completion is on its way to Redis: edits now would lose the race.
    Sealing,
    /// Redis refused its writes for good (its error); edits are refused with
    /// `unavailable` until the paper is read back from Redis.
    Failed(String),
}

impl Paper {
    pub fn new(id: Arc<str>, stored: StoredPaper, clock: &mut VersionClock) -> Self {
        let mut notes = HashMap::with_capacity(stored.notes.len());
        let mut live = 0;
        let mut tombstones = BTreeSet::new();
        let mut max_applied = 0;
        for (note_id, note) in stored.notes {
            clock.observe(note.v);
            max_applied = max_applied.max(note.v);
            let id: Arc<str> = Arc::from(note_id);
            if note.data.is_some() {
                live += 1;
            } else {
                tombstones.insert((note.v, id.clone()));
            }
            notes.insert(id, note);
        }
        Paper {
            tombstones,
            horizon: stored.horizon,
            max_applied,
            resume_floor: stored.resume_floor,
            floor_raised: false,
            cover: stored.cover,
            body: WeakShared::default(),
            revoked: stored.revoked.into_iter().map(|(user, until)| (Arc::from(user), until)).collect(),
            id,
            notes,
            live,
            completed_by: stored.completed_by.map(Arc::from),
            members: Vec::new(),
            remote: stored.remote_members,
            unwritten: 0,
            unwritten_notes: HashMap::new(),
            empty_since: Some(Instant::now()),
            health: Health::Writable,
        }
    }

    /// Refuses an edit the paper cannot take now, before anything else is checked
    /// but the role.
    fn check_writable(&self) -> Result<(), ErrorCode> {
        match self.health {
            _ if self.is_completed() => Err(ErrorCode::PaperCompleted),
            Health::Sealing => Err(ErrorCode::PaperCompleted),
            Health::Failed(_) => Err(ErrorCode::Unavailable),
            Health::Writable => Ok(()),
        }
    }

    /// Replaces the notes and the completion with what Redis holds (a paper read
    /// back after Redis refused its writes); members stay.
    pub fn replace(&mut self, stored: StoredPaper, clock: &mut VersionClock) {
        let fresh = Paper::new(self.id.clone(), StoredPaper { remote_members: Vec::new(), ..stored }, clock);
        self.changed();
        self.notes = fresh.notes;
        self.live = fresh.live;
        self.tombstones = fresh.tombstones;
        self.cover = fresh.cover;
        self.horizon = self.horizon.max(fresh.horizon);
        // Members were sent what Redis refused: nothing they hold may be resumed from.
        self.resume_floor = self.resume_floor.max(fresh.resume_floor).max(self.max_applied);
        self.max_applied = self.max_applied.max(fresh.max_applied);
        self.completed_by = fresh.completed_by;
        self.health = Health::Writable;
    }

    /// Seals the paper with exactly these notes (as Redis sealed them); false if it
    /// was sealed already.
    pub fn seal(&mut self, by: &Arc<str>, notes: Vec<(Arc<str>, Note)>) -> bool {
        if self.is_completed() {
            return false;
        }
        self.changed();
        self.live = notes.iter().filter(|(_, n)| n.data.is_some()).count();
        self.notes = notes.into_iter().collect();
        self.tombstones.clear();
        // The seal replaces every view: a client resuming from before it gets it whole.
        self.resume_floor = self.resume_floor.max(self.max_applied);
        self.completed_by = Some(by.clone());
        self.health = Health::Writable;
        true
    }

    /// Whether `apply` would take this edit: it advances the note's version, or
    /// the note is not there and the edit is above the horizon.
    pub fn can_apply(&self, edit: &Edit) -> bool {
        self.resolve(edit).is_some()
    }

    /// What an upsert or a delete makes of its note, if it changes it: last
    /// writer wins by version, per field once patches gave fields versions of
    /// their own (a delete is weighed against the last upsert, so it wins over
    /// patches made after it: a patch never brings back part of a note).
    fn resolve(&self, edit: &Edit) -> Option<Note> {
        let new = &edit.note;
        match self.notes.get(&edit.id) {
            None => (new.v > self.horizon).then(|| new.clone()),
            // A note read back from Redis with its own field versions: the newer
            // note, whole (a re-read after the relay was away).
            Some(current) if new.fields.is_some() => {
                clock::newer((new.v, &new.node), (current.v, &current.node)).then(|| new.clone())
            }
            Some(current) if current.data.is_some() && current.fields.is_some() => match new.data {
                Some(_) => fields::merge_upsert(current, new),
                None => clock::newer((new.v, &new.node), fields::base_of(current)).then(|| new.clone()),
            },
            Some(current) => clock::newer((new.v, &new.node), (current.v, &current.node)).then(|| new.clone()),
        }
    }

    /// Decides a patch of some fields of a note by `user` acting as `role`: the
    /// same rights and limits as replacing it (PROTOCOL.md 3.2, 1.1).
    ///
    /// # Errors
    /// `forbidden`, `paper_completed`, `unavailable` as for an upsert; `not_found`
    /// for a note that does not exist or is deleted; `too_large` when the note
    /// would pass `max_note_bytes`; `invalid_message` for data that is not an object.
    pub fn prepare_patch(
        &self,
        id: &str,
        data: &str,
        (user, role): (&Arc<str>, Role),
        clock: &mut VersionClock,
        limits: &PaperLimits,
    ) -> Result<Patch, ErrorCode> {
        if !role.may_write() {
            return Err(ErrorCode::Forbidden);
        }
        self.check_writable()?;
        let Some((key, note)) = self.notes.get_key_value(id).filter(|(_, n)| n.data.is_some()) else {
            return Err(ErrorCode::NotFound);
        };
        if note.author != *user && !role.may_moderate() {
            return Err(ErrorCode::Forbidden);
        }
        let fields: Vec<(String, Option<Box<serde_json::value::RawValue>>)> =
            serde_json::from_str::<std::collections::BTreeMap<_, _>>(data)
                .map_err(|_| ErrorCode::InvalidMessage)?
                .into_iter()
                .collect();
        let v = clock.next(note.v).ok_or(ErrorCode::Unavailable)?;
        let node = clock.node().clone();
        if let Some((patched, _)) = fields::merge_patch(note, &fields, v, &node) {
            if patched.data.as_deref().map_or(0, str::len) > limits.max_note_bytes {
                return Err(ErrorCode::TooLarge);
            }
        }
        Ok(Patch { id: key.clone(), fields, v, node })
    }

    /// What `apply_patch` would send, without applying it.
    pub fn patch_result(&self, patch: &Patch) -> Option<String> {
        let current = self.notes.get(&patch.id).filter(|n| n.data.is_some())?;
        let (_, advanced) = fields::merge_patch(current, &patch.fields, patch.v, &patch.node)?;
        Some(fields::patch_data(&advanced))
    }

    /// Applies a patch to a live note, field by field; returns the `data` of the
    /// fields it advanced (what members are sent), or `None` when it advanced
    /// none or the note is not live.
    pub fn apply_patch(&mut self, patch: &Patch) -> Option<String> {
        let current = self.notes.get(&patch.id).filter(|n| n.data.is_some())?;
        let (note, advanced) = fields::merge_patch(current, &patch.fields, patch.v, &patch.node)?;
        self.store_note(patch.id.clone(), note);
        Some(fields::patch_data(&advanced))
    }

    /// Takes the horizon Redis holds (a paper read again after the relay was
    /// away): a note this paper shows that Redis does not hold (not in
    /// `stored`), at or below that horizon, was deleted meanwhile and its
    /// tombstone dropped, so it goes here too. Returns each such note's id and
    /// the version of its removal, above the note's own.
    pub fn forget_dropped(&mut self, horizon: u64, stored: &HashSet<&str>) -> Vec<(Arc<str>, u64)> {
        self.horizon = self.horizon.max(horizon);
        let gone: Vec<(Arc<str>, u64)> = self
            .notes
            .iter()
            .filter(|(id, note)| note.data.is_some() && note.v <= horizon && !stored.contains(&***id))
            .map(|(id, note)| (id.clone(), horizon.max(note.v + 1)))
            .collect();
        for (id, _) in &gone {
            self.notes.remove(id);
            self.live -= 1;
        }
        gone
    }

    /// Drops the tombstones past retention (older than `now_ms` minus it) or past
    /// the cap, oldest first, and raises the horizon to the greatest dropped
    /// version; returns how many were dropped.
    pub fn prune(&mut self, now_ms: u64, limits: &PaperLimits) -> usize {
        let cutoff = (now_ms << 10).saturating_sub(limits.tombstone_retention);
        let mut dropped = 0;
        while let Some((v, id)) = self.tombstones.first().cloned() {
            if v >= cutoff && self.tombstones.len() <= limits.max_tombstones {
                break;
            }
            self.tombstones.pop_first();
            self.notes.remove(&id);
            self.horizon = self.horizon.max(v);
            dropped += 1;
        }
        dropped
    }

    /// What a client that saw versions up to `since` misses (PROTOCOL.md 3.1,
    /// 1.1): every note above `since` minus the resume window, or the whole
    /// paper when `since` is below the horizon or at or below the resume floor.
    pub fn resume(&self, since: u64) -> Resume<'_> {
        if since < self.horizon || since <= self.resume_floor {
            return Resume::Full;
        }
        let from = since.saturating_sub(RESUME_WINDOW);
        let mut changed: Vec<NoteChange> =
            self.notes.iter().filter(|(_, n)| n.v > from).map(|(id, note)| NoteChange { id, note }).collect();
        changed.sort_unstable_by_key(|c| c.note.v);
        Resume::Since(since, changed)
    }

    pub fn is_completed(&self) -> bool {
        self.completed_by.is_some()
    }

    pub fn note(&self, id: &str) -> Option<&Note> {
        self.notes.get(id)
    }

    /// Live notes, oldest version first.
    pub fn live_notes(&self) -> impl Iterator<Item = NoteView<'_>> {
        let mut live: Vec<(&Arc<str>, &Note)> = self.notes.iter().filter(|(_, n)| n.data.is_some()).collect();
        live.sort_unstable_by_key(|(_, n)| n.v);
        live.into_iter().map(|(id, n)| NoteView {
            id,
            author: &n.author,
            data: n.data.as_deref().unwrap_or("{}"),
            v: n.v,
        })
    }

    pub fn live_count(&self) -> usize {
        self.live
    }

    /// Decides an upsert by `user` acting as `role`.
    ///
    /// # Errors
    /// `forbidden` for a viewer, or a writer replacing someone else's note;
    /// `paper_completed` once sealed; `paper_full` for a new note at `max_notes`.
    pub fn prepare_upsert(
        &self,
        id: &str,
        data: String,
        (user, role): (&Arc<str>, Role),
        clock: &mut VersionClock,
        limits: &PaperLimits,
    ) -> Result<Edit, ErrorCode> {
        if !role.may_write() {
            return Err(ErrorCode::Forbidden);
        }
        self.check_writable()?;
        let current = self.notes.get_key_value(id);
        let author = match current {
            Some((_, Note { author, data: Some(_), .. })) if author != user && !role.may_moderate() => {
                return Err(ErrorCode::Forbidden)
            }
            // Replacing data never changes the author.
            Some((_, Note { author, data: Some(_), .. })) => author.clone(),
            // A new note, or one created again after a delete.
            _ if self.live >= limits.max_notes => return Err(ErrorCode::PaperFull),
            _ => user.clone(),
        };
        // A note created anew goes above the horizon, so that Redis takes it.
        let floor = current.map_or(self.horizon, |(_, n)| n.v);
        let id = current.map_or_else(|| Arc::from(id), |(key, _)| key.clone());
        let v = clock.next(floor).ok_or(ErrorCode::Unavailable)?;
        Ok(Edit { id, note: Note { author, data: Some(Arc::from(data)), v, node: clock.node().clone(), fields: None } })
    }

    /// Decides a delete by `user` acting as `role`.
    ///
    /// # Errors
    /// `forbidden` for a viewer, or a writer deleting someone else's note;
    /// `paper_completed` once sealed; `not_found` for a note that does not exist
    /// or is deleted already.
    pub fn prepare_delete(
        &self,
        id: &str,
        (user, role): (&Arc<str>, Role),
        clock: &mut VersionClock,
    ) -> Result<Edit, ErrorCode> {
        if !role.may_write() {
            return Err(ErrorCode::Forbidden);
        }
        self.check_writable()?;
        match self.notes.get_key_value(id) {
            Some((_, note)) if note.data.is_some() && note.author != *user && !role.may_moderate() => {
                Err(ErrorCode::Forbidden)
            }
            Some((key, note)) if note.data.is_some() => Ok(Edit {
                id: key.clone(),
                note: Note {
                    author: note.author.clone(),
                    data: None,
                    v: clock.next(note.v).ok_or(ErrorCode::Unavailable)?,
                    node: clock.node().clone(),
                    fields: None,
                },
            }),
            _ => Err(ErrorCode::NotFound),
        }
    }

    /// Applies an edit if it advances the note's version (last writer wins, ties
    /// to the greater node); returns whether it did.
    pub fn apply(&mut self, edit: Edit) -> bool {
        let Some(note) = self.resolve(&edit) else { return false };
        self.store_note(edit.id, note);
        true
    }

    /// An edit of this note was handed to the store.
    pub fn awaits_write(&mut self, id: &Arc<str>) {
        self.unwritten += 1;
        *self.unwritten_notes.entry(id.clone()).or_default() += 1;
    }

    /// The store reported an edit of this paper (of `note`, if of a note).
    pub fn written(&mut self, note: Option<&Arc<str>>) {
        self.unwritten = self.unwritten.saturating_sub(1);
        let Some(id) = note else { return };
        if let Some(count) = self.unwritten_notes.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                self.unwritten_notes.remove(id);
            }
        }
    }

    /// Takes a live note out, keeping no tombstone: Redis does not hold it
    /// (another node deleted it), and what Redis holds of it comes back by the
    /// relay or a read, at its own versions. Returns the version it had.
    pub fn forget_live(&mut self, id: &Arc<str>) -> Option<u64> {
        let v = self.notes.get(id).filter(|n| n.data.is_some())?.v;
        self.notes.remove(id);
        self.live -= 1;
        Some(v)
    }

    /// As `apply`, for a note Redis holds live (read from it, or relayed by the
    /// write script that applied it): one this paper does not have is taken
    /// whatever its version. This node's horizon is its own (its own tombstones
    /// dropped), and may be past a note another node wrote while this one was
    /// away; Redis, where every write is judged, took it.
    ///
    /// Not for a note with an edit of this node not yet written: it may be a
    /// delete whose tombstone this node dropped, and Redis, not having it yet,
    /// still holds the note; that note waits for the delete, as `apply` judges.
    pub fn apply_held(&mut self, edit: Edit) -> bool {
        let away = !self.notes.contains_key(&edit.id) && !self.unwritten_notes.contains_key(&edit.id);
        if edit.note.data.is_some() && away {
            self.store_note(edit.id, edit.note);
            return true;
        }
        self.apply(edit)
    }

    /// Puts a note in place, keeping the counts, tombstones and floor right.
    fn store_note(&mut self, id: Arc<str>, note: Note) {
        let edit = Edit { id, note };
        let was_live = match self.notes.get(&edit.id) {
            Some(current) if current.data.is_none() => {
                self.tombstones.remove(&(current.v, edit.id.clone()));
                false
            }
            Some(_) => true,
            None => false,
        };
        let v = edit.note.v;
        // A change that arrives more than the resume window below what was applied
        // already would be missed by a client resuming from above it.
        if v.saturating_add(RESUME_WINDOW) < self.max_applied && self.max_applied > self.resume_floor {
            self.resume_floor = self.max_applied;
            self.floor_raised = true;
        }
        self.max_applied = self.max_applied.max(v);
        let is_live = edit.note.data.is_some();
        if !is_live {
            self.tombstones.insert((v, edit.id.clone()));
        }
        self.live = self.live + usize::from(is_live) - usize::from(was_live);
        self.notes.insert(edit.id, edit.note);
        self.changed();
    }

    /// What snapshots and `GET /papers` say of the paper changed: its encoded
    /// body is stale.
    fn changed(&mut self) {
        self.body = WeakShared::default();
    }

    /// The encoded body of this version, if a connection still holds it.
    pub fn shared_body(&self) -> Option<Shared> {
        self.body.upgrade()
    }

    /// Remembers the encoded body of this version, without keeping it.
    pub fn remember_body(&mut self, body: &Shared) {
        self.body = body.downgrade();
    }

    /// The resume floor, if it rose since the last call (PROTOCOL.md 3.1: it is
    /// relayed, so that every node knows it).
    pub fn take_raised_floor(&mut self) -> Option<u64> {
        std::mem::take(&mut self.floor_raised).then_some(self.resume_floor)
    }

    /// Another node's resume floor.
    pub fn raise_floor(&mut self, floor: u64) {
        self.resume_floor = self.resume_floor.max(floor);
    }

    /// Tombstones held (bounded by `max_tombstones` once pruned).
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// What snapshots say of the paper itself.
    pub fn view(&self) -> PaperView<'_> {
        PaperView {
            id: &self.id,
            completed: self.is_completed(),
            cover_data: self.cover.as_ref().map_or("{}", |c| &c.data),
            cover_v: self.cover.as_ref().map_or(0, |c| c.v),
        }
    }

    /// Decides a cover change (`meta`) by `role`.
    ///
    /// # Errors
    /// `forbidden` for any role but owner; `paper_completed` once sealed;
    /// `unavailable` while the paper cannot be written.
    pub fn prepare_cover(&self, data: String, role: Role, clock: &mut VersionClock) -> Result<Cover, ErrorCode> {
        if !role.may_complete() {
            return Err(ErrorCode::Forbidden);
        }
        self.check_writable()?;
        let v = clock.next(self.cover.as_ref().map_or(0, |c| c.v)).ok_or(ErrorCode::Unavailable)?;
        Ok(Cover { data: Arc::from(data), v, node: clock.node().clone() })
    }

    /// Sets the cover if it advances the cover's version; returns whether it did.
    pub fn apply_cover(&mut self, cover: Cover) -> bool {
        if self.is_completed() {
            return false;
        }
        if let Some(current) = &self.cover {
            if !clock::newer((cover.v, &cover.node), (current.v, &current.node)) {
                return false;
            }
        }
        self.cover = Some(cover);
        self.changed();
        true
    }

    /// Decides whether `role` may seal the paper now.
    ///
    /// # Errors
    /// `forbidden` for any role but owner; `paper_completed` if it is sealed already.
    pub fn check_complete(&self, role: Role) -> Result<(), ErrorCode> {
        if !role.may_complete() {
            return Err(ErrorCode::Forbidden);
        }
        self.check_writable()
    }

    /// Seals the paper.
    ///
    /// # Errors
    /// `paper_completed` if it is sealed already.
    pub fn complete(&mut self, by: &Arc<str>) -> Result<(), ErrorCode> {
        if self.is_completed() {
            return Err(ErrorCode::PaperCompleted);
        }
        self.completed_by = Some(by.clone());
        self.changed();
        Ok(())
    }

    /// The members on this node: the recipients of its broadcasts.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every member, on this node and the others, as a snapshot lists them.
    pub fn all_members(&self) -> impl Iterator<Item = MemberView<'_>> {
        self.members.iter().map(Member::view).chain(self.remote.iter().map(RemoteMember::view))
    }

    /// A member joined on another node; false if it was known already.
    pub fn add_remote(&mut self, member: RemoteMember) -> bool {
        if self.remote.iter().any(|m| m.id == member.id) {
            return false;
        }
        self.remote.push(member);
        true
    }

    /// A member left another node; false if it was not known.
    pub fn remove_remote(&mut self, id: &str) -> bool {
        let before = self.remote.len();
        self.remote.retain(|m| &*m.id != id);
        self.remote.len() != before
    }

    /// A node is gone: its members leave; returns their ids.
    pub fn remove_node(&mut self, node: &str) -> Vec<Arc<str>> {
        let (gone, kept): (Vec<RemoteMember>, Vec<RemoteMember>) =
            std::mem::take(&mut self.remote).into_iter().partition(|m| &*m.node == node);
        self.remote = kept;
        gone.into_iter().map(|m| m.id).collect()
    }

    /// Whether `user` may not join at `now` (unix seconds); a revocation past is
    /// forgotten.
    pub fn is_revoked(&mut self, user: &str, now: u64) -> bool {
        match self.revoked.get(user) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.revoked.remove(user);
                false
            }
            None => false,
        }
    }

    /// Revokes `user` until `until` (unix seconds); returns the keys of its
    /// members here, whose sessions end.
    pub fn revoke(&mut self, user: &Arc<str>, until: u64) -> Vec<usize> {
        self.revoked.insert(user.clone(), until);
        self.members.iter().filter(|m| m.user == *user).map(|m| m.key).collect()
    }

    pub fn is_full_of_members(&self, limits: &PaperLimits) -> bool {
        self.members.len() >= limits.max_members
    }

    pub fn add_member(&mut self, member: Member) {
        self.empty_since = None;
        self.members.push(member);
    }

    /// Removes the member with this loop key and returns it.
    pub fn remove_member(&mut self, key: usize) -> Option<Member> {
        let at = self.members.iter().position(|m| m.key == key)?;
        let member = self.members.swap_remove(at);
        if self.members.is_empty() {
            self.empty_since = Some(Instant::now());
        }
        Some(member)
    }
}

#[cfg(test)]
mod tests;
