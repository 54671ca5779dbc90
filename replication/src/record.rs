//! A record is an automerge document; this module maps JSON onto it and back.
//!
//! # Document layout (record format 2)
//!
//! Everything lives in the document's root map, which every replica shares from the start, so
//! two regions that create the same record concurrently merge field by field instead of one
//! region's whole value replacing the other's. Root keys are namespaced by a prefix:
//!
//! * `v:<field>` holds the top-level field `<field>` of the user's JSON object: maps, lists,
//!   strings, i64/u64 integers, floats, booleans and null.
//! * `c:<field>\u{1f}<actor>` holds counters. A counter field `f` is the sum of its entries,
//!   one per writer (actor = node + incarnation). Each writer only creates and increments its
//!   own entry, so concurrent first increments in two regions never collide on one automerge
//!   key (automerge would keep only one of two concurrently *created* counters), and every
//!   increment counts.
//! * `live` is set to the writer's version string by every write and removed by a delete. A
//!   record exists while `live` is present.
//!
//! Why flat, and not a `v` map under the root: automerge's cost is per operation inserted into
//! its op set (~10 µs each in 0.12), and a batch insert (`init_root_from_hydrate`,
//! `batch_create_object`) costs about as much as two. A record's first write builds the whole
//! root in one batch, and every new nested object or array is created in one batch, which is
//! only possible for objects that the batch itself creates — the root of an empty document is
//! one. (Format 1 created shared `v`/`c` maps in a fixed genesis change; every field then cost
//! one insert.)
//!
//! # Delete against a concurrent update
//!
//! A delete removes what it has observed: every field, counter entry and the `live` marker it
//! saw. An update in another region that the delete had not seen sets `live` again, so after
//! the merge the record exists and holds the fields that the concurrent update wrote (the
//! fields the delete observed stay removed). In short: *a concurrent update survives a delete*
//! (observed-remove), in every region alike. Increments concurrent with a delete of their
//! counter are removed with it: automerge keeps a deleted counter deleted.
//!
//! # Conflicts
//!
//! When two regions write the same field concurrently, automerge keeps both values and picks
//! one deterministically (by operation id, never by wall clock). [`RecordView::conflicts`]
//! lists, per JSON-pointer path, the values it did not pick, so that users see the collision.

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, AutomergeError, Change, ObjId, ObjType, ROOT, ReadDoc, ScalarValue,
    Value as AmValue, hydrate,
};
use serde::Serialize;
use serde_json::{Map, Number, Value as Json};

use crate::version::Version;
use render::{render_value, scalar_json};

/// Deepest JSON nesting accepted in a value (an object at the top is depth 1).
pub const MAX_DEPTH: usize = 32;

/// Root keys of the user's top-level fields start with this.
const VALUE_PREFIX: &str = "v:";
/// Root keys of counter entries start with this.
const COUNTER_PREFIX: &str = "c:";
const LIVE_KEY: &str = "live";
const COUNTER_SEPARATOR: char = '\u{1f}';

/// What a read shows of a record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordView {
    pub value: Map<String, Json>,
    /// Per JSON-pointer path, the concurrent values the merge did not pick.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub conflicts: BTreeMap<String, Vec<Json>>,
}

/// What [`RecordDoc::apply_tracked`] did with each offered change (indexes into its input).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteApply {
    /// Applied now: their bytes belong in the stored document.
    pub applied: Vec<usize>,
    /// Waiting for changes they depend on.
    pub waiting: Vec<usize>,
    /// Undecodable, with the reason.
    pub undecodable: Vec<(usize, String)>,
    /// Already in the document.
    pub already_held: usize,
    /// The greatest version among the changes applied now.
    pub newest: Option<Version>,
}

/// The bytes of one committed automerge change and the version stamped on it.
#[derive(Clone, Debug)]
pub struct LocalChange {
    pub bytes: Vec<u8>,
    pub version: Version,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("field {field:?} holds {found}, not a counter; only counter fields can be incremented")]
    NotACounter { field: String, found: &'static str },
    #[error("incrementing counter {field:?} by {by} would overflow a 64-bit integer")]
    CounterOverflow { field: String, by: i64 },
    #[error("counter field name must be non-empty and must not contain U+001F")]
    BadCounterField,
    #[error("the record does not exist")]
    NotFound,
    #[error("value nesting is deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("stored record document cannot be loaded: {0}")]
    Corrupt(String),
    #[error("change cannot be decoded: {0}")]
    BadChange(String),
    #[error("automerge panicked while applying remote changes; the document must be reloaded")]
    Poisoned,
    #[error("the edit produced no change (internal error)")]
    NoChange,
    #[error("automerge rejected the operation: {0}")]
    Automerge(#[from] AutomergeError),
}

/// The depth of a JSON value: scalars are 0, an object or array is 1 + its deepest child.
pub fn json_depth(value: &Json) -> usize {
    // Iterative, so that hostile input cannot exhaust the stack.
    let mut deepest = 0;
    let mut stack: Vec<(&Json, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Json::Object(m) => {
                deepest = deepest.max(depth + 1);
                stack.extend(m.values().map(|c| (c, depth + 1)));
            }
            Json::Array(a) => {
                deepest = deepest.max(depth + 1);
                stack.extend(a.iter().map(|c| (c, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The version stamped on a change by [`RecordDoc`]'s local edits, if it carries one.
pub fn change_version(change: &Change) -> Option<Version> {
    change.message().and_then(|m| m.parse().ok())
}

fn value_key(field: &str) -> String {
    let mut key = String::with_capacity(VALUE_PREFIX.len() + field.len());
    key.push_str(VALUE_PREFIX);
    key.push_str(field);
    key
}

fn counter_key(field: &str, tag: &str) -> String {
    format!("{COUNTER_PREFIX}{field}{COUNTER_SEPARATOR}{tag}")
}

/// The root keys that start with `prefix` (a range: root keys are ordered).
fn prefix_range(prefix: &str) -> std::ops::Range<String> {
    let mut end = prefix.to_string();
    // Both prefixes end in ':'; the next character bounds the range.
    end.pop();
    end.push(';');
    prefix.to_string()..end
}

/// One record's document, with the actor of this node's incarnation.
pub struct RecordDoc {
    doc: AutoCommit,
    counter_tag: String,
    /// The view, when known without rendering: right after a record's first write, it is the
    /// written value with its keys ordered as automerge orders them. Any other edit or merge
    /// clears it.
    known_view: Option<RecordView>,
}

impl RecordDoc {
    /// A record that does not exist yet: an empty document.
    pub fn new(actor: ActorId) -> Result<Self, RecordError> {
        let counter_tag = actor.to_hex_string();
        let doc = AutoCommit::new().with_actor(actor);
        Ok(RecordDoc {
            doc,
            counter_tag,
            known_view: None,
        })
    }

    /// Load stored bytes (a saved document, optionally followed by appended change chunks).
    pub fn load(bytes: &[u8], actor: ActorId) -> Result<Self, RecordError> {
        let counter_tag = actor.to_hex_string();
        let doc = AutoCommit::load(bytes)
            .map_err(|e| RecordError::Corrupt(e.to_string()))?
            .with_actor(actor);
        let record = RecordDoc {
            doc,
            counter_tag,
            known_view: None,
        };
        // A format-1 document kept the value in a `v` map; its fields would all be invisible.
        if record.doc.get(ROOT, "v")?.is_some() || record.doc.get(ROOT, "c")?.is_some() {
            return Err(RecordError::Corrupt(
                "document has the record format 1 layout (a `v` map under the root)".to_string(),
            ));
        }
        Ok(record)
    }

    /// True when the document holds no change at all (a record never written here).
    fn is_blank(&self) -> bool {
        self.doc.is_empty() && self.doc.pending_ops() == 0
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    pub fn exists(&self) -> bool {
        matches!(self.doc.get(ROOT, LIVE_KEY), Ok(Some(_)))
    }

    /// Replace the value: fields left out are removed, unchanged fields are left alone so
    /// that they merge with concurrent edits elsewhere.
    pub fn put(
        &mut self,
        value: &Map<String, Json>,
        stamp: Version,
    ) -> Result<LocalChange, RecordError> {
        check_depth(value)?;
        if self.is_blank() {
            return self.create(value, stamp);
        }
        self.edit(stamp, |rec| {
            let totals = rec.counter_totals()?;
            let mut plain = value.clone();
            for (field, (total, entries)) in totals {
                let keep_counter = rec.doc.get(ROOT, value_key(&field))?.is_none()
                    && plain.get(&field).and_then(Json::as_i64) == Some(total);
                if keep_counter {
                    plain.remove(&field);
                } else {
                    for entry in entries {
                        rec.doc.delete(ROOT, entry.as_str())?;
                    }
                }
            }
            let stale: Vec<String> = rec
                .doc
                .map_range(ROOT, prefix_range(VALUE_PREFIX))
                .filter(|item| !plain.contains_key(&item.key[VALUE_PREFIX.len()..]))
                .map(|item| item.key.to_string())
                .collect();
            for key in stale {
                rec.doc.delete(ROOT, key.as_str())?;
            }
            for (field, v) in &plain {
                set_field(&mut rec.doc, &ROOT, &value_key(field), v)?;
            }
            Ok(())
        })
    }

    /// The first write of a record: the whole root (fields and `live`) in one batch insert.
    fn create(
        &mut self,
        value_fields: &Map<String, Json>,
        stamp: Version,
    ) -> Result<LocalChange, RecordError> {
        let mut root: std::collections::HashMap<String, hydrate::Value> = value_fields
            .iter()
            .map(|(field, v)| (value_key(field), hydrate_of(v)))
            .collect();
        root.insert(
            LIVE_KEY.to_string(),
            hydrate::Value::Scalar(ScalarValue::Str(stamp.to_string().into())),
        );
        let result = self
            .doc
            .init_root_from_hydrate(&hydrate::Map::from(root))
            .map_err(RecordError::from);
        let change = self.finish(result, stamp)?;
        self.known_view = Some(RecordView {
            value: fields_in_key_order(value_fields),
            conflicts: BTreeMap::new(),
        });
        Ok(change)
    }

    /// Apply an RFC 7386 JSON merge patch to the value.
    pub fn patch(
        &mut self,
        patch: &Map<String, Json>,
        stamp: Version,
    ) -> Result<LocalChange, RecordError> {
        check_depth(patch)?;
        if self.is_blank() {
            // RFC 7386 against nothing: the patch without its nulls.
            let Json::Object(value) = strip_nulls(&Json::Object(patch.clone())) else {
                return Err(RecordError::NoChange);
            };
            return self.create(&value, stamp);
        }
        self.edit(stamp, |rec| {
            let totals = rec.counter_totals()?;
            for (field, patch_value) in patch {
                let key = value_key(field);
                if let Some((total, entries)) = totals.get(field) {
                    // Writing a counter field with its current total keeps it a counter;
                    // anything else replaces the counter.
                    if rec.doc.get(ROOT, key.as_str())?.is_none()
                        && patch_value.as_i64() == Some(*total)
                    {
                        continue;
                    }
                    for entry in entries {
                        rec.doc.delete(ROOT, entry.as_str())?;
                    }
                }
                merge_patch_field(&mut rec.doc, &ROOT, &key, patch_value)?;
            }
            Ok(())
        })
    }

    /// Add `by` to the counter `field` (created at `by` if absent).
    pub fn incr(
        &mut self,
        field: &str,
        by: i64,
        stamp: Version,
    ) -> Result<LocalChange, RecordError> {
        if field.is_empty() || field.contains(COUNTER_SEPARATOR) {
            return Err(RecordError::BadCounterField);
        }
        if let Some((current, _)) = self.doc.get(ROOT, value_key(field))? {
            return Err(RecordError::NotACounter {
                field: field.to_string(),
                found: kind_name(&current),
            });
        }
        let totals = self.counter_totals()?;
        let total = totals.get(field).map_or(0, |(t, _)| *t);
        if total.checked_add(by).is_none() {
            return Err(RecordError::CounterOverflow {
                field: field.to_string(),
                by,
            });
        }
        let entry = counter_key(field, &self.counter_tag);
        self.edit(stamp, |rec| {
            if rec.doc.get(ROOT, entry.as_str())?.is_some() {
                rec.doc.increment(ROOT, entry.as_str(), by)?;
            } else {
                rec.doc
                    .put(ROOT, entry.as_str(), ScalarValue::counter(by))?;
            }
            Ok(())
        })
    }

    /// Delete the record: remove every field and counter observed, and the `live` marker.
    pub fn delete(&mut self, stamp: Version) -> Result<LocalChange, RecordError> {
        if !self.exists() {
            return Err(RecordError::NotFound);
        }
        let result = (|| -> Result<(), RecordError> {
            // Every field, every counter entry and `live`: all of the root.
            let keys: Vec<String> = self.doc.keys(ROOT).collect();
            for key in keys {
                self.doc.delete(ROOT, key.as_str())?;
            }
            Ok(())
        })();
        self.finish(result, stamp)
    }

    /// The record as a read shows it, or `None` if it does not exist (never written, or
    /// deleted).
    pub fn view(&self) -> Result<Option<RecordView>, RecordError> {
        if let Some(known) = &self.known_view {
            return Ok(Some(known.clone()));
        }
        self.render_view()
    }

    /// Apply changes received from another node. Returns the greatest version among them.
    /// A change already held is a no-op.
    pub fn apply_remote<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Option<Version>, RecordError> {
        let mut decoded = Vec::new();
        let mut newest: Option<Version> = None;
        for bytes in changes {
            let change =
                Change::try_from(bytes).map_err(|e| RecordError::BadChange(e.to_string()))?;
            if let Some(v) = change_version(&change) {
                newest = newest.max(Some(v));
            }
            decoded.push(change);
        }
        self.known_view = None;
        self.doc.apply_changes(decoded)?;
        Ok(newest)
    }

    /// Apply remote changes and say what became of each: applied now, already held, waiting
    /// for changes it depends on (automerge queues those; the caller must keep them durably
    /// and offer them again), or undecodable.
    ///
    /// A panic inside automerge is contained here and reported as [`RecordError::Poisoned`]:
    /// the document may then be inconsistent, and the caller must drop it and reload.
    pub fn apply_tracked(&mut self, changes: &[Vec<u8>]) -> Result<RemoteApply, RecordError> {
        let mut out = RemoteApply::default();
        let mut decoded = Vec::new();
        let mut hashes = Vec::new();
        for (i, bytes) in changes.iter().enumerate() {
            match Change::try_from(bytes.as_slice()) {
                Ok(change) => {
                    let hash = change.hash();
                    if self.holds(&hash) {
                        out.already_held += 1;
                        continue;
                    }
                    hashes.push((i, hash, change_version(&change)));
                    decoded.push(change);
                }
                Err(e) => out.undecodable.push((i, e.to_string())),
            }
        }
        if decoded.is_empty() {
            return Ok(out);
        }
        self.known_view = None;
        let doc = &mut self.doc;
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(decoded)));
        match applied {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(RecordError::Automerge(e)),
            Err(_) => return Err(RecordError::Poisoned),
        }
        for (i, hash, version) in hashes {
            if self.holds(&hash) {
                out.applied.push(i);
                if let Some(v) = version {
                    out.newest = out.newest.max(Some(v));
                }
            } else {
                out.waiting.push(i);
            }
        }
        Ok(out)
    }

    /// True when the change `hash` is applied to the document (not merely queued for missing
    /// dependencies). `get_missing_deps` answers from the change graph and the queue;
    /// `get_change_by_hash` would rebuild the whole change from the op set, which cost ~9 % of
    /// a catch-up's CPU in a profile. The answer is empty exactly when `hash` is applied: a
    /// queued change always has a missing dependency on its path, or it would have been applied.
    fn holds(&mut self, hash: &automerge::ChangeHash) -> bool {
        self.doc
            .get_missing_deps(std::slice::from_ref(hash))
            .is_empty()
    }

    /// Every change of the document, as bytes, in causal order.
    pub fn changes(&mut self) -> Vec<Vec<u8>> {
        self.doc
            .get_changes(&[])
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// The greatest version among the changes this document holds.
    pub fn max_version(&mut self) -> Version {
        self.doc
            .get_changes(&[])
            .iter()
            .filter_map(change_version)
            .max()
            .unwrap_or(Version::ZERO)
    }

    fn edit(
        &mut self,
        stamp: Version,
        body: impl FnOnce(&mut Self) -> Result<(), RecordError>,
    ) -> Result<LocalChange, RecordError> {
        let result = body(self).and_then(|()| {
            self.doc
                .put(ROOT, LIVE_KEY, stamp.to_string())
                .map_err(RecordError::from)
        });
        self.finish(result, stamp)
    }

    fn finish(
        &mut self,
        result: Result<(), RecordError>,
        stamp: Version,
    ) -> Result<LocalChange, RecordError> {
        self.known_view = None;
        if let Err(e) = result {
            self.doc.rollback();
            return Err(e);
        }
        let options = CommitOptions::default()
            .with_message(stamp.to_string())
            .with_time((stamp.unix_ms() / 1000) as i64);
        self.doc.commit_with(options).ok_or(RecordError::NoChange)?;
        let change = self
            .doc
            .get_last_local_change()
            .ok_or(RecordError::NoChange)?;
        Ok(LocalChange {
            bytes: change.raw_bytes().to_vec(),
            version: stamp,
        })
    }

    /// Counter fields: total and the root keys of the entries that make it up.
    fn counter_totals(&self) -> Result<BTreeMap<String, (i64, Vec<String>)>, RecordError> {
        let mut totals: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
        for item in self.doc.map_range(ROOT, prefix_range(COUNTER_PREFIX)) {
            let entry = &item.key[COUNTER_PREFIX.len()..];
            let Some((field, _writer)) = entry.rsplit_once(COUNTER_SEPARATOR) else {
                continue;
            };
            let amount = match AmValue::from(item.value) {
                AmValue::Scalar(s) => match s.as_ref() {
                    ScalarValue::Counter(n) => i64::from(n),
                    ScalarValue::Int(n) => *n,
                    _ => 0,
                },
                _ => 0,
            };
            let slot = totals.entry(field.to_string()).or_insert((0, Vec::new()));
            slot.0 = slot.0.saturating_add(amount);
            slot.1.push(item.key.to_string());
        }
        Ok(totals)
    }
}

fn check_depth(map: &Map<String, Json>) -> Result<(), RecordError> {
    // The map itself is level 1.
    let deepest = map.values().map(json_depth).max().unwrap_or(0) + 1;
    if deepest > MAX_DEPTH {
        return Err(RecordError::TooDeep);
    }
    Ok(())
}

fn kind_name(v: &AmValue<'_>) -> &'static str {
    match v {
        AmValue::Object(ObjType::Map | ObjType::Table) => "an object",
        AmValue::Object(ObjType::List) => "an array",
        AmValue::Object(ObjType::Text) => "a string",
        AmValue::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(_) => "a string",
            ScalarValue::Int(_) | ScalarValue::Uint(_) | ScalarValue::F64(_) => "a plain number",
            ScalarValue::Boolean(_) => "a boolean",
            ScalarValue::Null => "null",
            _ => "a non-JSON value",
        },
    }
}

fn scalar_of(number: &Number) -> ScalarValue {
    if let Some(i) = number.as_i64() {
        ScalarValue::Int(i)
    } else if let Some(u) = number.as_u64() {
        ScalarValue::Uint(u)
    } else {
        ScalarValue::F64(number.as_f64().unwrap_or(0.0))
    }
}

/// A JSON object with the keys of every object in it ordered as automerge orders map keys
/// (by their UTF-8 bytes), which is how a rendered view shows them.
fn fields_in_key_order(map: &Map<String, Json>) -> Map<String, Json> {
    fn ordered(value: &Json) -> Json {
        match value {
            Json::Object(m) => Json::Object(fields_in_key_order(m)),
            Json::Array(items) => Json::Array(items.iter().map(ordered).collect()),
            other => other.clone(),
        }
    }
    let mut entries: Vec<(&String, &Json)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    entries
        .into_iter()
        .map(|(k, v)| (k.clone(), ordered(v)))
        .collect()
}

/// The value as automerge's batch inserts take it: strings stay scalars (not text objects).
fn hydrate_of(value: &Json) -> hydrate::Value {
    match value {
        Json::Object(m) => {
            let map: std::collections::HashMap<String, hydrate::Value> =
                m.iter().map(|(k, v)| (k.clone(), hydrate_of(v))).collect();
            hydrate::Value::Map(hydrate::Map::from(map))
        }
        Json::Array(items) => {
            hydrate::Value::List(items.iter().map(hydrate_of).collect::<Vec<_>>().into())
        }
        Json::Null => hydrate::Value::Scalar(ScalarValue::Null),
        Json::Bool(b) => hydrate::Value::Scalar(ScalarValue::Boolean(*b)),
        Json::Number(n) => hydrate::Value::Scalar(scalar_of(n)),
        Json::String(s) => hydrate::Value::Scalar(ScalarValue::Str(s.as_str().into())),
    }
}

/// Put `value` under a map key as a fresh value; a new object or array is built in one batch.
fn put_new(doc: &mut AutoCommit, obj: &ObjId, key: &str, value: &Json) -> Result<(), RecordError> {
    match value {
        Json::Object(_) | Json::Array(_) => {
            doc.batch_create_object(obj, key, &hydrate_of(value), false)?;
        }
        Json::Null => doc.put(obj, key, ScalarValue::Null)?,
        Json::Bool(b) => doc.put(obj, key, *b)?,
        Json::Number(n) => doc.put(obj, key, scalar_of(n))?,
        Json::String(s) => doc.put(obj, key, s.as_str())?,
    }
    Ok(())
}

/// Make the map `obj` equal to `target`, touching only what differs.
fn put_map(
    doc: &mut AutoCommit,
    obj: &ObjId,
    target: &Map<String, Json>,
) -> Result<(), RecordError> {
    let stale: Vec<String> = doc.keys(obj).filter(|k| !target.contains_key(k)).collect();
    for key in stale {
        doc.delete(obj, key.as_str())?;
    }
    for (key, value) in target {
        set_field(doc, obj, key, value)?;
    }
    Ok(())
}

/// Set one map field to `value`, reusing an existing, unconflicted child object so that
/// concurrent edits of its other fields still merge.
fn set_field(
    doc: &mut AutoCommit,
    obj: &ObjId,
    key: &str,
    value: &Json,
) -> Result<(), RecordError> {
    let conflicted = doc.get_all(obj, key)?.len() > 1;
    let current = doc.get(obj, key)?.map(|(v, id)| (v.into_owned(), id));
    match (current, value) {
        (Some((AmValue::Object(ObjType::Map), child)), Json::Object(m)) if !conflicted => {
            put_map(doc, &child, m)
        }
        (Some((current, id)), _) if !conflicted && render_value(doc, &current, &id)? == *value => {
            Ok(())
        }
        _ => put_new(doc, obj, key, value),
    }
}

/// RFC 7386 for one member of the patch.
fn merge_patch_field(
    doc: &mut AutoCommit,
    obj: &ObjId,
    key: &str,
    patch: &Json,
) -> Result<(), RecordError> {
    match patch {
        Json::Null => {
            if doc.get(obj, key)?.is_some() {
                doc.delete(obj, key)?;
            }
            Ok(())
        }
        Json::Object(members) => {
            let conflicted = doc.get_all(obj, key)?.len() > 1;
            match doc.get(obj, key)?.map(|(v, id)| (v.into_owned(), id)) {
                Some((AmValue::Object(ObjType::Map), child)) if !conflicted => {
                    for (k, v) in members {
                        merge_patch_field(doc, &child, k, v)?;
                    }
                    Ok(())
                }
                // Patching a non-object (or nothing) starts from {}: nulls vanish.
                _ => put_new(doc, obj, key, &strip_nulls(patch)),
            }
        }
        other => set_field(doc, obj, key, other),
    }
}

fn strip_nulls(value: &Json) -> Json {
    match value {
        Json::Object(m) => Json::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

pub mod first_write;
mod render;

#[cfg(test)]
mod tests;
