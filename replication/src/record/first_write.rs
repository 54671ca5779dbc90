//! A record's first change, written and read without an automerge document.
//!
//! Writing a record's first change through an automerge document, or reading one received from
//! another region into one, costs ~60–75 µs of CPU (`record_costs`): an empty op set is built,
//! the ops are spliced in, the change is re-encoded from the op set, and it is all freed again.
//! A first change is a plain tree of insertions, so it can be encoded straight from the JSON
//! (~20 µs) and its view read from its decoded ops (~11 µs). The record's stored document is
//! that change's bytes either way; an automerge document is made from them only when the record
//! is next edited or merged.
//!
//! [`encode`] emits the operations that [`RecordDoc::put`] emits on a blank document
//! (`init_root_from_hydrate`): every field under its `v:` root key, objects as maps, arrays as
//! lists, strings as scalars, and the `live` key. [`view_of`] accepts only changes of exactly
//! that shape (no dependencies, no overwrites, deletes, counters, text or marks) and answers
//! `None` for anything else, so that the caller applies those through automerge instead. The
//! property tests check both against automerge's own rendering.
//!
//! [`RecordDoc::put`]: super::RecordDoc::put

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;

use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};
use automerge::{ActorId, Change, ExpandedChange, ObjType, ScalarValue};
use serde_json::{Map, Value as Json};

use super::{
    LIVE_KEY, LocalChange, MAX_DEPTH, RecordError, RecordView, VALUE_PREFIX, change_version,
    check_depth, fields_in_key_order, scalar_json, scalar_of, strip_nulls, value_key,
};
use crate::version::Version;

/// The first change of a record that does not exist yet, setting it to `value`, and the view
/// it gives. Equivalent to [`RecordDoc::put`] on a blank document.
///
/// [`RecordDoc::put`]: super::RecordDoc::put
pub fn encode(
    actor: &ActorId,
    value: &Map<String, Json>,
    stamp: Version,
) -> Result<(LocalChange, RecordView), RecordError> {
    check_depth(value)?;
    let mut ops = Vec::with_capacity(value.len() * 2 + 1);
    for (field, v) in value {
        emit(
            &mut ops,
            actor,
            ObjectId::Root,
            Key::Map(value_key(field).into()),
            false,
            v,
        );
    }
    ops.push(Op {
        action: OpType::Put(ScalarValue::Str(stamp.to_string().into())),
        obj: ObjectId::Root,
        key: Key::Map(LIVE_KEY.into()),
        pred: SortedVec::new(),
        insert: false,
    });
    let expanded = ExpandedChange {
        operations: ops,
        actor_id: actor.clone(),
        hash: None,
        seq: 1,
        start_op: NonZeroU64::MIN,
        // As `RecordDoc` commits: the stamp's wall-clock seconds and the stamp as the message.
        time: (stamp.unix_ms() / 1000) as i64,
        message: Some(stamp.to_string()),
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    };
    // Preds are empty, so the builder's one failure (preds out of order) cannot occur.
    let change = Change::from(expanded);
    Ok((
        LocalChange {
            bytes: change.raw_bytes().to_vec(),
            version: stamp,
        },
        RecordView {
            value: fields_in_key_order(value),
            conflicts: BTreeMap::new(),
        },
    ))
}

/// [`encode`] for a merge patch on a record that does not exist: RFC 7386 against nothing is
/// the patch without its nulls, as [`RecordDoc::patch`] does on a blank document.
///
/// [`RecordDoc::patch`]: super::RecordDoc::patch
pub fn encode_patch(
    actor: &ActorId,
    patch: &Map<String, Json>,
    stamp: Version,
) -> Result<(LocalChange, RecordView), RecordError> {
    check_depth(patch)?;
    let Json::Object(value) = strip_nulls(&Json::Object(patch.clone())) else {
        return Err(RecordError::NoChange);
    };
    encode(actor, &value, stamp)
}

/// Append the ops that create `value` at `key` of `obj`; returns the id of the op made.
fn emit(
    ops: &mut Vec<Op>,
    actor: &ActorId,
    obj: ObjectId,
    key: Key,
    insert: bool,
    value: &Json,
) -> OpId {
    // Op ids count from the change's start op (1): op n is the (n+1)th pushed.
    let id = OpId::new(ops.len() as u64 + 1, actor);
    let action = match value {
        Json::Object(_) => OpType::Make(ObjType::Map),
        Json::Array(_) => OpType::Make(ObjType::List),
        Json::Null => OpType::Put(ScalarValue::Null),
        Json::Bool(b) => OpType::Put(ScalarValue::Boolean(*b)),
        Json::Number(n) => OpType::Put(scalar_of(n)),
        Json::String(s) => OpType::Put(ScalarValue::Str(s.as_str().into())),
    };
    ops.push(Op {
        action,
        obj,
        key,
        pred: SortedVec::new(),
        insert,
    });
    match value {
        Json::Object(m) => {
            for (k, v) in m {
                emit(
                    ops,
                    actor,
                    ObjectId::Id(id.clone()),
                    Key::Map(k.as_str().into()),
                    false,
                    v,
                );
            }
        }
        Json::Array(items) => {
            let mut previous = ElementId::Head;
            for v in items {
                let element = emit(
                    ops,
                    actor,
                    ObjectId::Id(id.clone()),
                    Key::Seq(previous),
                    true,
                    v,
                );
                previous = ElementId::Id(element);
            }
        }
        _ => {}
    }
    id
}

/// What a record's first change shows, read without a document.
#[derive(Clone, Debug, PartialEq)]
pub struct FirstView {
    pub view: RecordView,
    /// The version stamped on the change, if it carries one.
    pub version: Option<Version>,
}

enum Item {
    Scalar(ScalarValue),
    Object(usize),
}

enum Node {
    Map(BTreeMap<String, Item>),
    /// The items in order and the op counter of the last one (a list's next insert follows it).
    List(Vec<Item>, Option<u64>),
}

/// The view of a document made of exactly this one change, when the change is the first write
/// of a record in the shape [`encode`] (or `RecordDoc::put` on a blank document) makes it.
/// `None` when the change does not decode, has dependencies, or holds anything else; applying
/// it through automerge then decides.
pub fn view_of(bytes: &[u8]) -> Option<FirstView> {
    let change = Change::try_from(bytes).ok()?;
    if !change.deps().is_empty() {
        return None;
    }
    let version = change_version(&change);
    // Expanding maps each op's actor index through an `unwrap` inside automerge; a change
    // from the network with an index beyond its actors would panic there. It is then left to
    // `apply_tracked`, which contains automerge's panics and quarantines the change.
    let expanded =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())).ok()?;
    let actor = &expanded.actor_id;
    let start = expanded.start_op.get();
    // Node 0 is the root map; objects made by the change by their op counter, with their depth.
    let mut nodes: Vec<Node> = vec![Node::Map(BTreeMap::new())];
    let mut depth_of: Vec<usize> = vec![0];
    let mut made: HashMap<u64, usize> = HashMap::new();
    for (i, op) in expanded.operations.iter().enumerate() {
        let counter = start.checked_add(i as u64)?;
        if !op.pred.is_empty() {
            return None;
        }
        let parent = match &op.obj {
            ObjectId::Root => 0,
            ObjectId::Id(id) if id.actor() == actor => *made.get(&id.counter())?,
            ObjectId::Id(_) => return None,
        };
        let item = match &op.action {
            OpType::Put(ScalarValue::Counter(_)) => return None,
            OpType::Put(s) => Item::Scalar(s.clone()),
            OpType::Make(kind @ (ObjType::Map | ObjType::List)) => {
                let depth = depth_of[parent] + 1;
                // The root is the record; its `v:` fields are the value's top level.
                if depth > MAX_DEPTH {
                    return None;
                }
                nodes.push(match kind {
                    ObjType::List => Node::List(Vec::new(), None),
                    _ => Node::Map(BTreeMap::new()),
                });
                depth_of.push(depth);
                made.insert(counter, nodes.len() - 1);
                Item::Object(nodes.len() - 1)
            }
            _ => return None,
        };
        match (&mut nodes[parent], &op.key) {
            (Node::Map(entries), Key::Map(k)) if !op.insert => {
                if entries.insert(k.to_string(), item).is_some() {
                    return None;
                }
            }
            (Node::List(items, last), Key::Seq(after)) if op.insert => {
                let follows_last = match (after, *last) {
                    (ElementId::Head, None) => true,
                    (ElementId::Id(id), Some(l)) => id.counter() == l && id.actor() == actor,
                    _ => false,
                };
                if !follows_last {
                    return None;
                }
                items.push(item);
                *last = Some(counter);
            }
            _ => return None,
        }
    }
    let Node::Map(root) = std::mem::replace(&mut nodes[0], Node::Map(BTreeMap::new())) else {
        return None;
    };
    let mut live = false;
    let mut value = Map::new();
    for (key, item) in root {
        if key == LIVE_KEY {
            live = true;
        } else if let Some(field) = key.strip_prefix(VALUE_PREFIX) {
            value.insert(field.to_string(), render(&mut nodes, item)?);
        } else {
            return None;
        }
    }
    if !live {
        return None;
    }
    Some(FirstView {
        view: RecordView {
            value,
            conflicts: BTreeMap::new(),
        },
        version,
    })
}

/// Render an item; depth is bounded by [`MAX_DEPTH`] when the nodes were made.
fn render(nodes: &mut [Node], item: Item) -> Option<Json> {
    Some(match item {
        Item::Scalar(s) => scalar_json(&s),
        Item::Object(n) => match std::mem::replace(nodes.get_mut(n)?, Node::Map(BTreeMap::new())) {
            Node::Map(entries) => {
                let mut out = Map::new();
                for (k, v) in entries {
                    out.insert(k, render(nodes, v)?);
                }
                Json::Object(out)
            }
            Node::List(items, _) => Json::Array(
                items
                    .into_iter()
                    .map(|v| render(nodes, v))
                    .collect::<Option<Vec<_>>>()?,
            ),
        },
    })
}
