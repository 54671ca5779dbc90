//! Rendering a record document as JSON: the view a read shows, and the values each merge did
//! not pick ([`RecordView::conflicts`]), keyed by JSON pointer.
//!
//! Invariant: rendering only reads the document; two replicas holding the same changes render
//! the same view and the same conflicts.

use std::collections::BTreeMap;

use automerge::{AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value as AmValue};
use serde_json::{Map, Number, Value as Json};

use super::{RecordDoc, RecordError, RecordView, VALUE_PREFIX, prefix_range};

impl RecordDoc {
    /// The view rendered from the document (what [`RecordDoc::view`] shows when it has no
    /// known view).
    pub fn render_view(&self) -> Result<Option<RecordView>, RecordError> {
        if !self.exists() {
            return Ok(None);
        }
        let mut conflicts = BTreeMap::new();
        let mut value = Map::new();
        for item in self.doc.map_range(ROOT, prefix_range(VALUE_PREFIX)) {
            let field = &item.key[VALUE_PREFIX.len()..];
            let field_path = pointer_push("", field);
            let item_id = item.id();
            let item_value = AmValue::from(item.value);
            if item.conflict {
                let losers = losers(&self.doc, &ROOT, item.key.as_ref().into(), &item_id)?;
                conflicts.insert(field_path.clone(), losers);
            }
            let rendered = render_any(
                &self.doc,
                &item_value,
                &item_id,
                Some(&field_path),
                &mut conflicts,
            )?;
            value.insert(field.to_string(), rendered);
        }
        for (field, (total, _)) in self.counter_totals()? {
            if value.contains_key(&field) {
                // A plain value written concurrently with the first increment: the plain
                // value is shown, the counter is reported as the conflicting value.
                conflicts
                    .entry(pointer_push("", &field))
                    .or_insert_with(Vec::new)
                    .push(Json::from(total));
            } else {
                value.insert(field, Json::from(total));
            }
        }
        Ok(Some(RecordView { value, conflicts }))
    }
}

fn pointer_push(path: &str, segment: &str) -> String {
    format!("{path}/{}", segment.replace('~', "~0").replace('/', "~1"))
}

pub(super) fn scalar_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        // Not produced by Meridian; a foreign writer's bytes render as null.
        ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } | ScalarValue::Null => Json::Null,
    }
}

/// Render a value without collecting conflicts (used for conflict values themselves and for
/// comparisons).
pub(super) fn render_value(
    doc: &AutoCommit,
    value: &AmValue<'_>,
    id: &ObjId,
) -> Result<Json, RecordError> {
    let mut ignored = BTreeMap::new();
    render_any(doc, value, id, None, &mut ignored)
}

/// Render `value` (whose object id is `id`); with a `path`, record conflicts below it.
fn render_any(
    doc: &AutoCommit,
    value: &AmValue<'_>,
    id: &ObjId,
    path: Option<&str>,
    conflicts: &mut BTreeMap<String, Vec<Json>>,
) -> Result<Json, RecordError> {
    Ok(match value {
        AmValue::Scalar(s) => scalar_json(s),
        AmValue::Object(ObjType::Map | ObjType::Table) => {
            Json::Object(render_map(doc, id, path, conflicts)?)
        }
        AmValue::Object(ObjType::List) => {
            let mut items = Vec::new();
            // One pass over the visible values; conflicting ones are looked up separately.
            for item in doc.list_range(id, ..) {
                let item_path = path.map(|p| format!("{p}/{}", item.index));
                let item_id = item.id();
                let item_value = AmValue::from(item.value);
                if item.conflict
                    && let Some(p) = &item_path
                {
                    let losers = losers(doc, id, item.index.into(), &item_id)?;
                    conflicts.insert(p.clone(), losers);
                }
                items.push(render_any(
                    doc,
                    &item_value,
                    &item_id,
                    item_path.as_deref(),
                    conflicts,
                )?);
            }
            Json::Array(items)
        }
        AmValue::Object(ObjType::Text) => Json::String(doc.text(id)?),
    })
}

fn render_map(
    doc: &AutoCommit,
    obj: &ObjId,
    path: Option<&str>,
    conflicts: &mut BTreeMap<String, Vec<Json>>,
) -> Result<Map<String, Json>, RecordError> {
    let mut out = Map::new();
    for item in doc.map_range(obj, ..) {
        let key = item.key.to_string();
        let field_path = path.map(|p| pointer_push(p, &key));
        let item_id = item.id();
        let item_value = AmValue::from(item.value);
        if item.conflict
            && let Some(p) = &field_path
        {
            let losers = losers(doc, obj, key.as_str().into(), &item_id)?;
            conflicts.insert(p.clone(), losers);
        }
        let rendered = render_any(doc, &item_value, &item_id, field_path.as_deref(), conflicts)?;
        out.insert(key, rendered);
    }
    Ok(out)
}

/// The values at `prop` other than the winner, rendered.
fn losers(
    doc: &AutoCommit,
    obj: &ObjId,
    prop: automerge::Prop,
    winner: &ObjId,
) -> Result<Vec<Json>, RecordError> {
    let mut out = Vec::new();
    for (v, id) in doc.get_all(obj, prop)? {
        if id != *winner {
            out.push(render_value(doc, &v, &id)?);
        }
    }
    Ok(out)
}
