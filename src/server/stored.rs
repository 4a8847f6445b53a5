//! The store's values in the paper module's terms, and back: the store knows
//! neither the server nor the paper, and the paper knows no store, so the
//! server, which holds both, converts between them here.

use std::sync::Arc;

use crate::paper::{Cover, Note, RemoteMember, StoredPaper};
use crate::store::{self, NoteValue};

/// A paper as the store read it, in the paper module's terms.
pub(super) fn paper(stored: store::StoredPaper) -> StoredPaper {
    StoredPaper {
        notes: stored.notes.into_iter().map(|(id, n)| (id, note(n))).collect(),
        completed_by: stored.completed_by,
        horizon: stored.horizon,
        resume_floor: stored.resume_floor,
        revoked: stored.revoked,
        cover: stored.cover.map(|c| Cover { data: c.data.unwrap_or_else(|| Arc::from("{}")), v: c.v, node: c.node }),
        remote_members: stored
            .remote_members
            .into_iter()
            .map(|m| RemoteMember { id: m.id, user: m.user, name: m.name, node: m.node })
            .collect(),
    }
}

/// A note the store read, in the paper's terms.
pub(super) fn note(note: NoteValue) -> Note {
    Note { author: note.author, data: note.data, v: note.v, node: note.node, fields: note.fields }
}

/// A note as the store writes it.
pub(super) fn note_value(note: &Note) -> NoteValue {
    NoteValue {
        author: note.author.clone(),
        data: note.data.clone(),
        v: note.v,
        node: note.node.clone(),
        fields: note.fields.clone(),
    }
}
