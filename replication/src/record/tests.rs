use super::*;
use proptest::prelude::*;
use serde_json::json;

fn actor(n: u8) -> ActorId {
    ActorId::from(vec![n; 16])
}

fn stamp(t: u64, node: u64) -> Version {
    Version {
        time_ntp64: t,
        node_hlc_id: node,
    }
}

fn obj(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        other => panic!("test value is not an object: {other}"),
    }
}

fn view(doc: &RecordDoc) -> RecordView {
    doc.view().expect("view").expect("record exists")
}

/// Exchange every change between two replicas, in the given direction order.
fn sync(a: &mut RecordDoc, b: &mut RecordDoc) {
    let from_a = a.changes();
    let from_b = b.changes();
    b.apply_remote(from_a.iter().map(Vec::as_slice))
        .expect("b applies a");
    a.apply_remote(from_b.iter().map(Vec::as_slice))
        .expect("a applies b");
}

#[test]
fn put_then_view_returns_the_value() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    assert!(doc.view().unwrap().is_none());
    let value = json!({"name": "ada", "n": 3, "x": 1.5, "ok": true, "none": null,
                       "tags": ["a", {"b": [1, 2]}], "nested": {"deep": {"er": "yes"}}});
    doc.put(&obj(value.clone()), stamp(10, 1)).unwrap();
    let v = view(&doc);
    assert_eq!(Json::Object(v.value), value);
    assert!(v.conflicts.is_empty());
}

#[test]
fn put_removes_fields_left_out() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.put(&obj(json!({"a": 1, "b": {"c": 2, "d": 3}})), stamp(1, 1))
        .unwrap();
    doc.put(&obj(json!({"b": {"d": 4}})), stamp(2, 1)).unwrap();
    assert_eq!(Json::Object(view(&doc).value), json!({"b": {"d": 4}}));
}

#[test]
fn patch_follows_rfc_7386() {
    // The example of RFC 7386 section 3.
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.put(
        &obj(
            json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
                    "tags": ["example", "sample"], "content": "This will be unchanged"}),
        ),
        stamp(1, 1),
    )
    .unwrap();
    doc.patch(
        &obj(json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890",
                    "author": {"familyName": null}, "tags": ["example"]})),
        stamp(2, 1),
    )
    .unwrap();
    assert_eq!(
        Json::Object(view(&doc).value),
        json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
               "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
    );
    // Patching a scalar with an object starts from {} and drops nulls.
    doc.patch(&obj(json!({"title": {"a": 1, "b": null}})), stamp(3, 1))
        .unwrap();
    assert_eq!(view(&doc).value["title"], json!({"a": 1}));
}

#[test]
fn patch_on_a_missing_record_creates_it() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.patch(&obj(json!({"a": 1, "gone": null})), stamp(1, 1))
        .unwrap();
    assert_eq!(Json::Object(view(&doc).value), json!({"a": 1}));
}

#[test]
fn incr_creates_and_adds_and_refuses_non_counters() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.incr("hits", 2, stamp(1, 1)).unwrap();
    doc.incr("hits", 5, stamp(2, 1)).unwrap();
    doc.incr("hits", -1, stamp(3, 1)).unwrap();
    assert_eq!(view(&doc).value["hits"], json!(6));
    doc.patch(&obj(json!({"name": "x"})), stamp(4, 1)).unwrap();
    let err = doc.incr("name", 1, stamp(5, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            RecordError::NotACounter {
                found: "a string",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        view(&doc).value["hits"],
        json!(6),
        "a refused incr changes nothing"
    );
    assert!(matches!(
        doc.incr("hits", i64::MAX, stamp(6, 1)),
        Err(RecordError::CounterOverflow { .. })
    ));
}

#[test]
fn put_keeps_a_counter_when_its_total_is_unchanged_and_replaces_it_otherwise() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.incr("hits", 3, stamp(1, 1)).unwrap();
    doc.put(&obj(json!({"hits": 3, "a": 1})), stamp(2, 1))
        .unwrap();
    doc.incr("hits", 1, stamp(3, 1)).expect("still a counter");
    assert_eq!(view(&doc).value["hits"], json!(4));
    doc.put(&obj(json!({"hits": 10})), stamp(4, 1)).unwrap();
    assert!(matches!(
        doc.incr("hits", 1, stamp(5, 1)),
        Err(RecordError::NotACounter { .. })
    ));
    assert_eq!(Json::Object(view(&doc).value), json!({"hits": 10}));
}

#[test]
fn delete_hides_the_record_and_a_second_delete_is_not_found() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.put(&obj(json!({"a": 1})), stamp(1, 1)).unwrap();
    doc.incr("n", 1, stamp(2, 1)).unwrap();
    doc.delete(stamp(3, 1)).unwrap();
    assert!(doc.view().unwrap().is_none());
    assert!(matches!(
        doc.delete(stamp(4, 1)),
        Err(RecordError::NotFound)
    ));
    doc.put(&obj(json!({"b": 2})), stamp(5, 1)).unwrap();
    assert_eq!(Json::Object(view(&doc).value), json!({"b": 2}));
}

#[test]
fn concurrent_creations_merge_field_by_field() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    a.put(&obj(json!({"from_a": 1})), stamp(1, 1)).unwrap();
    b.put(&obj(json!({"from_b": 2})), stamp(1, 2)).unwrap();
    sync(&mut a, &mut b);
    let va = view(&a);
    assert_eq!(
        Json::Object(va.value.clone()),
        json!({"from_a": 1, "from_b": 2})
    );
    assert_eq!(va, view(&b));
}

#[test]
fn concurrent_creations_of_one_nested_field_keep_one_and_show_the_other() {
    // Both first writes build their root in one batch; the nested objects are distinct, so
    // automerge keeps one and the other is the conflict, identically in either merge order.
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    a.put(
        &obj(json!({"addr": {"city": "Oslo"}, "a": [1, 2]})),
        stamp(1, 1),
    )
    .unwrap();
    b.put(
        &obj(json!({"addr": {"city": "Lima"}, "b": true})),
        stamp(1, 2),
    )
    .unwrap();
    let (from_a, from_b) = (a.changes(), b.changes());
    let mut ab = RecordDoc::new(actor(3)).unwrap();
    ab.apply_remote(from_a.iter().chain(&from_b).map(Vec::as_slice))
        .unwrap();
    let mut ba = RecordDoc::new(actor(4)).unwrap();
    ba.apply_remote(from_b.iter().map(Vec::as_slice)).unwrap();
    ba.apply_remote(from_a.iter().map(Vec::as_slice)).unwrap();
    let (v1, v2) = (view(&ab), view(&ba));
    assert_eq!(v1, v2);
    assert_eq!(v1.value["a"], json!([1, 2]));
    assert_eq!(v1.value["b"], json!(true));
    let winner = v1.value["addr"]["city"].as_str().unwrap().to_string();
    let loser = if winner == "Oslo" { "Lima" } else { "Oslo" };
    assert_eq!(v1.conflicts["/addr"], vec![json!({"city": loser})]);
}

#[test]
fn fields_inside_a_batch_created_object_merge_with_concurrent_edits() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    a.put(
        &obj(json!({"profile": {"name": "ada", "langs": ["en"]}, "n": 1})),
        stamp(1, 1),
    )
    .unwrap();
    sync(&mut a, &mut b);
    a.patch(&obj(json!({"profile": {"name": "Ada"}})), stamp(2, 1))
        .unwrap();
    b.patch(
        &obj(json!({"profile": {"city": "London"}, "n": 2})),
        stamp(2, 2),
    )
    .unwrap();
    sync(&mut a, &mut b);
    assert_eq!(view(&a), view(&b));
    assert_eq!(
        Json::Object(view(&a).value),
        json!({"profile": {"name": "Ada", "langs": ["en"], "city": "London"}, "n": 2})
    );
    assert!(view(&a).conflicts.is_empty());
}

#[test]
fn a_record_format_1_document_is_refused_on_load() {
    let mut old = AutoCommit::new();
    old.put_object(ROOT, "v", ObjType::Map).unwrap();
    old.put_object(ROOT, "c", ObjType::Map).unwrap();
    let bytes = old.save();
    match RecordDoc::load(&bytes, actor(1)) {
        Err(RecordError::Corrupt(why)) => assert!(why.contains("format 1"), "{why}"),
        other => panic!("format 1 loaded: {:?}", other.map(|_| ())),
    }
}

#[test]
fn concurrent_first_increments_all_count() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    a.incr("n", 1, stamp(1, 1)).unwrap();
    b.incr("n", 1, stamp(1, 2)).unwrap();
    b.incr("n", 3, stamp(2, 2)).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(view(&a).value["n"], json!(5));
    a.incr("n", 10, stamp(3, 1)).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(view(&a).value["n"], json!(15));
    assert_eq!(view(&a), view(&b));
}

#[test]
fn concurrent_writes_to_one_field_show_the_loser_as_a_conflict() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    a.put(&obj(json!({"color": "red", "size": 1})), stamp(1, 1))
        .unwrap();
    sync(&mut a, &mut b);
    a.patch(&obj(json!({"color": "green"})), stamp(2, 1))
        .unwrap();
    b.patch(&obj(json!({"color": "blue", "size": 2})), stamp(2, 2))
        .unwrap();
    sync(&mut a, &mut b);
    let (va, vb) = (view(&a), view(&b));
    assert_eq!(va, vb);
    let winner = va.value["color"].clone();
    let losers = &va.conflicts["/color"];
    assert_eq!(losers.len(), 1);
    let mut both = vec![winner, losers[0].clone()];
    both.sort_by_key(|v| v.to_string());
    assert_eq!(both, vec![json!("blue"), json!("green")]);
    assert_eq!(va.value["size"], json!(2));
    assert!(!va.conflicts.contains_key("/size"));
    // Writing the field again resolves the conflict.
    a.patch(&obj(json!({"color": "black"})), stamp(3, 1))
        .unwrap();
    assert!(view(&a).conflicts.is_empty());
}

#[test]
fn a_concurrent_update_survives_a_delete() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    a.put(&obj(json!({"old": 1, "keep": 2})), stamp(1, 1))
        .unwrap();
    sync(&mut a, &mut b);
    a.delete(stamp(2, 1)).unwrap();
    b.patch(&obj(json!({"new": 3})), stamp(2, 2)).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(Json::Object(view(&a).value), json!({"new": 3}));
    assert_eq!(view(&a), view(&b));
}

#[test]
fn save_load_and_appended_changes_round_trip() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.put(&obj(json!({"a": 1})), stamp(1, 1)).unwrap();
    let mut stored = doc.save();
    let change = doc.patch(&obj(json!({"b": [1, 2]})), stamp(2, 1)).unwrap();
    stored.extend_from_slice(&change.bytes);
    let mut loaded = RecordDoc::load(&stored, actor(1)).unwrap();
    assert_eq!(view(&loaded), view(&doc));
    assert_eq!(loaded.max_version(), stamp(2, 1));
    assert!(RecordDoc::load(b"not a document", actor(1)).is_err());
    assert!(RecordDoc::load(&stored[..stored.len() / 2], actor(1)).is_err());
}

#[test]
fn applying_a_change_twice_is_a_no_op() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    let change = a.incr("n", 4, stamp(1, 1)).unwrap();
    for _ in 0..3 {
        let newest = b.apply_remote([change.bytes.as_slice()]).unwrap();
        assert_eq!(newest, Some(stamp(1, 1)));
    }
    assert_eq!(view(&b).value["n"], json!(4));
    assert!(b.apply_remote([&b"garbage"[..]]).is_err());
}

#[test]
fn json_depth_counts_levels() {
    assert_eq!(json_depth(&json!(1)), 0);
    assert_eq!(json_depth(&json!({})), 1);
    assert_eq!(json_depth(&json!({"a": [{"b": 1}]})), 3);
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "x": deep });
    }
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    assert!(matches!(
        doc.put(&obj(deep), stamp(1, 1)),
        Err(RecordError::TooDeep)
    ));
}

fn arb_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        (-1e12f64..1e12f64).prop_map(Json::from),
        ".{0,12}".prop_map(Json::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..5)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = Map<String, Json>> {
    prop::collection::btree_map(".{0,8}", arb_json(), 0..6).prop_map(|m| m.into_iter().collect())
}

#[derive(Clone, Debug)]
enum Op {
    Put(Map<String, Json>),
    Patch(Map<String, Json>),
    Incr(String, i64),
    Delete,
}

fn arb_op() -> impl Strategy<Value = Op> {
    let field = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("n".to_string())
    ];
    let small = || {
        prop::collection::btree_map(
            prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just("n".to_string())
            ],
            arb_json(),
            0..3,
        )
        .prop_map(|m| m.into_iter().collect::<Map<_, _>>())
    };
    prop_oneof![
        small().prop_map(Op::Put),
        small().prop_map(Op::Patch),
        (field, -5i64..5).prop_map(|(f, by)| Op::Incr(f, by)),
        Just(Op::Delete),
    ]
}

fn run(doc: &mut RecordDoc, ops: &[Op], node: u64) {
    for (i, op) in ops.iter().enumerate() {
        let s = stamp(100 + i as u64, node);
        // Refusals (incr of a non-counter, delete of a missing record) are legitimate outcomes.
        let _ = match op {
            Op::Put(m) => doc.put(m, s),
            Op::Patch(m) => doc.patch(m, s),
            Op::Incr(f, by) => doc.incr(f, *by, s),
            Op::Delete => doc.delete(s),
        };
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_json_object_round_trips(value in arb_object()) {
        let mut doc = RecordDoc::new(actor(1)).unwrap();
        doc.put(&value, stamp(1, 1)).unwrap();
        prop_assert_eq!(&view(&doc).value, &value);
        let mut loaded = RecordDoc::load(&doc.save(), actor(1)).unwrap();
        prop_assert_eq!(&view(&loaded).value, &value);
        // A second put of the same value changes nothing but the version.
        loaded.put(&value, stamp(2, 1)).unwrap();
        prop_assert_eq!(&view(&loaded).value, &value);
    }

    #[test]
    fn the_known_view_of_a_first_write_is_what_rendering_shows(
        value in arb_object(),
        with_nulls in arb_object(),
    ) {
        // Insertion order reversed, so that the known view must reorder keys as rendering does.
        let reversed: Map<String, Json> = value.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut doc = RecordDoc::new(actor(1)).unwrap();
        doc.put(&reversed, stamp(1, 1)).unwrap();
        let known = doc.view().unwrap();
        let rendered = doc.render_view().unwrap();
        prop_assert_eq!(&known, &rendered);
        prop_assert_eq!(
            serde_json::to_vec(&known).unwrap(),
            serde_json::to_vec(&rendered).unwrap()
        );
        // A patch that creates the record drops its nulls; the known view agrees too.
        let mut patched = RecordDoc::new(actor(1)).unwrap();
        patched.patch(&with_nulls, stamp(1, 1)).unwrap();
        let known = patched.view().unwrap();
        prop_assert_eq!(
            serde_json::to_vec(&known).unwrap(),
            serde_json::to_vec(&patched.render_view().unwrap()).unwrap()
        );
        // Any later edit renders again.
        // (Generated field names are at most 8 characters: this one cannot collide.)
        doc.incr("a-counter-field", 2, stamp(2, 1)).unwrap();
        prop_assert_eq!(doc.view().unwrap(), doc.render_view().unwrap());
        prop_assert_eq!(&doc.view().unwrap().unwrap().value["a-counter-field"], &json!(2));
    }

    #[test]
    fn concurrent_edits_merge_identically_in_either_order(
        base in prop::collection::vec(arb_op(), 0..4),
        left in prop::collection::vec(arb_op(), 0..6),
        right in prop::collection::vec(arb_op(), 0..6),
    ) {
        let mut a = RecordDoc::new(actor(1)).unwrap();
        run(&mut a, &base, 1);
        let mut b = RecordDoc::new(actor(2)).unwrap();
        b.apply_remote(a.changes().iter().map(Vec::as_slice)).unwrap();
        run(&mut a, &left, 1);
        run(&mut b, &right, 2);
        let (from_a, from_b) = (a.changes(), b.changes());
        // a merges b's changes; a fresh replica c merges them in the opposite order.
        a.apply_remote(from_b.iter().map(Vec::as_slice)).unwrap();
        b.apply_remote(from_a.iter().map(Vec::as_slice)).unwrap();
        let mut c = RecordDoc::new(actor(3)).unwrap();
        c.apply_remote(from_b.iter().map(Vec::as_slice)).unwrap();
        c.apply_remote(from_a.iter().map(Vec::as_slice)).unwrap();
        let va = a.view().unwrap();
        prop_assert_eq!(&va, &b.view().unwrap());
        prop_assert_eq!(&va, &c.view().unwrap());
        prop_assert_eq!(a.max_version(), c.max_version());
    }
}

#[test]
fn apply_tracked_reports_waiting_changes_until_their_dependencies_arrive() {
    let mut a = RecordDoc::new(actor(1)).unwrap();
    let first = a.put(&obj(json!({"x": 1})), stamp(1, 1)).unwrap();
    let second = a.patch(&obj(json!({"y": 2})), stamp(2, 1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    // The second change depends on the first: offered alone, it waits.
    let r = b
        .apply_tracked(std::slice::from_ref(&second.bytes))
        .unwrap();
    assert_eq!((r.applied.clone(), r.waiting.clone()), (vec![], vec![0]));
    assert!(b.view().unwrap().is_none());
    // Offered again together with its dependency, both apply.
    let r = b
        .apply_tracked(&[second.bytes.clone(), first.bytes.clone()])
        .unwrap();
    assert_eq!(r.waiting, Vec::<usize>::new());
    assert_eq!(r.newest, Some(stamp(2, 1)));
    assert_eq!(view(&b), view(&a));
    // Repeats are counted as held; garbage is reported, not applied.
    let r = b
        .apply_tracked(&[first.bytes.clone(), b"junk".to_vec()])
        .unwrap();
    assert_eq!(r.already_held, 1);
    assert_eq!(r.undecodable.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_first_write_encoded_without_a_document_is_what_put_on_a_blank_document_makes(
        value in arb_object(),
    ) {
        let (change, known) = first_write::encode(&actor(1), &value, stamp(5, 1)).unwrap();
        prop_assert_eq!(change.version, stamp(5, 1));
        // The same view as automerge's own first write, and as automerge renders the bytes.
        let mut by_put = RecordDoc::new(actor(1)).unwrap();
        by_put.put(&value, stamp(5, 1)).unwrap();
        prop_assert_eq!(&known, &view(&by_put));
        let loaded = RecordDoc::load(&change.bytes, actor(1)).unwrap();
        prop_assert_eq!(&view(&loaded), &known);
        prop_assert_eq!(
            serde_json::to_vec(&view(&loaded)).unwrap(),
            serde_json::to_vec(&known).unwrap()
        );
        let (patched, patched_view) =
            first_write::encode_patch(&actor(1), &value, stamp(5, 1)).unwrap();
        let mut by_patch = RecordDoc::new(actor(1)).unwrap();
        by_patch.patch(&value, stamp(5, 1)).unwrap();
        prop_assert_eq!(&patched_view, &view(&by_patch));
        prop_assert_eq!(&view(&RecordDoc::load(&patched.bytes, actor(1)).unwrap()), &patched_view);
        let mut received = RecordDoc::new(actor(2)).unwrap();
        let r = received.apply_tracked(std::slice::from_ref(&change.bytes)).unwrap();
        prop_assert_eq!(r.applied, vec![0]);
        prop_assert_eq!(r.newest, Some(stamp(5, 1)));
        prop_assert_eq!(&view(&received), &known);
    }

    #[test]
    fn the_view_read_from_a_first_change_is_what_automerge_renders(value in arb_object()) {
        // Changes of both writers: automerge's first write and the direct encoding.
        let mut doc = RecordDoc::new(actor(1)).unwrap();
        let by_put = doc.put(&value, stamp(7, 3)).unwrap();
        let (encoded, _) = first_write::encode(&actor(1), &value, stamp(7, 3)).unwrap();
        for bytes in [&by_put.bytes, &encoded.bytes] {
            let read = first_write::view_of(bytes).expect("a first write is read directly");
            let rendered = view(&RecordDoc::load(bytes, actor(2)).unwrap());
            prop_assert_eq!(&read.view, &rendered);
            prop_assert_eq!(
                serde_json::to_vec(&read.view).unwrap(),
                serde_json::to_vec(&rendered).unwrap()
            );
            prop_assert_eq!(read.version, Some(stamp(7, 3)));
        }
    }
}

#[test]
fn a_record_first_written_without_a_document_edits_and_merges_like_any_other() {
    // Region A writes the record first without a document, region B writes it concurrently
    // through automerge; both then edit. Merged in either order, they agree.
    let (a_first, _) =
        first_write::encode(&actor(1), &obj(json!({"x": 1, "l": [1, 2]})), stamp(10, 1)).unwrap();
    let mut a = RecordDoc::load(&a_first.bytes, actor(1)).unwrap();
    a.patch(&obj(json!({"y": "a"})), stamp(12, 1)).unwrap();
    let mut b = RecordDoc::new(actor(2)).unwrap();
    b.put(&obj(json!({"x": 2})), stamp(11, 2)).unwrap();
    let mut c = RecordDoc::load(&a.save(), actor(3)).unwrap();
    sync(&mut a, &mut b);
    let (ca, cb) = (c.changes(), b.changes());
    c.apply_remote(cb.iter().map(Vec::as_slice)).unwrap();
    let mut d = RecordDoc::new(actor(4)).unwrap();
    d.apply_remote(cb.iter().map(Vec::as_slice)).unwrap();
    d.apply_remote(ca.iter().map(Vec::as_slice)).unwrap();
    let merged = view(&a);
    assert_eq!(view(&b), merged);
    assert_eq!(view(&c), merged);
    assert_eq!(view(&d), merged);
    // Concurrent first writes: one value wins, the other is a visible conflict.
    assert_eq!(merged.conflicts.len(), 1, "{merged:?}");
}

#[test]
fn changes_not_shaped_as_a_first_write_are_left_to_automerge() {
    let mut doc = RecordDoc::new(actor(1)).unwrap();
    doc.put(&obj(json!({"x": 1})), stamp(1, 1)).unwrap();
    // A second change has a dependency.
    let second = doc.patch(&obj(json!({"x": 2})), stamp(2, 1)).unwrap();
    assert!(first_write::view_of(&second.bytes).is_none());
    // A counter made by a first increment.
    let mut counter = RecordDoc::new(actor(1)).unwrap();
    let incr = counter.incr("n", 3, stamp(3, 1)).unwrap();
    assert!(first_write::view_of(&incr.bytes).is_none());
    assert!(first_write::view_of(b"not a change").is_none());
    // Nesting beyond MAX_DEPTH, which no write accepts, is not rendered here.
    let mut ops = Vec::new();
    let mut parent = automerge::legacy::ObjectId::Root;
    let mut key = automerge::legacy::Key::Map("v:deep".into());
    for i in 1..=(MAX_DEPTH as u64 + 2) {
        ops.push(automerge::legacy::Op {
            action: automerge::legacy::OpType::Make(ObjType::Map),
            obj: parent,
            key,
            pred: automerge::legacy::SortedVec::new(),
            insert: false,
        });
        parent = automerge::legacy::ObjectId::Id(automerge::legacy::OpId::new(i, &actor(1)));
        key = automerge::legacy::Key::Map("k".into());
    }
    ops.push(automerge::legacy::Op {
        action: automerge::legacy::OpType::Put(ScalarValue::Str("t".into())),
        obj: automerge::legacy::ObjectId::Root,
        key: automerge::legacy::Key::Map(LIVE_KEY.into()),
        pred: automerge::legacy::SortedVec::new(),
        insert: false,
    });
    let deep = Change::from(automerge::ExpandedChange {
        operations: ops,
        actor_id: actor(1),
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::MIN,
        time: 0,
        message: None,
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    });
    assert!(RecordDoc::load(deep.raw_bytes(), actor(2)).is_ok());
    assert!(first_write::view_of(deep.raw_bytes()).is_none());
}
