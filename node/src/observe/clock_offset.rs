//! How far this node's clock is from its peers' (finding F15), from the clock readings peers
//! put in their `Hello` and `Ack` messages.
//!
//! A sample compares a peer's reading with ours when the message arrived. For the peer's
//! answer to our own `Hello` we also know when we asked, and take the midpoint of the round
//! trip (an error of at most half of it); other messages give a one-way estimate that shows our
//! clock ahead by the one-way delay (milliseconds on a LAN, tens to a few hundred between
//! regions; the alarm threshold, `max_drift_ms`, is 500 by default). A peer's offset is the
//! median of its recent samples; the node's clock is *off* when it is more than the maximum
//! drift away from a strict majority of its connected peers (from the only one, with one).
//!
//! Invariant: [`sample_offset_ms`], [`peer_offset_ms`] and [`judge`] are pure; [`ClockWatch`]
//! only keeps a bounded number of samples per peer, and time comes in as arguments.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Samples kept per peer (the newest).
pub const SAMPLES_PER_PEER: usize = 8;
/// Samples older than this are forgotten: longer than the link age limit (1 h), after which
/// every link says `Hello` again, so a connected peer always has a sample this young.
pub const SAMPLE_MAX_AGE: Duration = Duration::from_secs(2 * 3600);
/// Peers tracked at most (peers are nodes of the topology, authenticated; this only bounds).
pub const MAX_TRACKED_PEERS: usize = 1024;

/// One clock reading of a peer, with ours around it. Times are NTP64 (32.32 fixed point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSample {
    /// The peer's physical clock when it sent the message.
    pub peer_ntp64: u64,
    /// Ours when we sent the message it answers, if it answers one.
    pub local_sent_ntp64: Option<u64>,
    /// Ours when it arrived.
    pub local_received_ntp64: u64,
}

/// How far our clock is ahead of the peer's according to one sample, in ms (negative: behind).
pub fn sample_offset_ms(sample: &ClockSample) -> i64 {
    let received = i128::from(sample.local_received_ntp64);
    let ours = match sample.local_sent_ntp64 {
        // A reply: the peer read its clock somewhere in our round trip; assume the middle.
        Some(sent) => (i128::from(sent) + received) / 2,
        None => received,
    };
    let diff_ntp64 = ours - i128::from(sample.peer_ntp64);
    // NTP64 has 2^32 units per second; rounded to the nearest ms.
    let (scaled, half) = (diff_ntp64 * 1000, 1i128 << 31);
    let ms = if scaled >= 0 {
        (scaled + half) >> 32
    } else {
        -((half - scaled) >> 32)
    };
    ms.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// A peer's offset from its samples' offsets: the median (the lower middle of an even count),
/// so one delayed message does not move it; `None` without samples.
pub fn peer_offset_ms(offsets_ms: &[i64]) -> Option<i64> {
    let mut sorted = offsets_ms.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// What the samples say about this node's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockVerdict {
    /// The median of the peers' offsets: how far this node's clock is ahead of the cluster's
    /// (negative: behind); `None` before any sample.
    pub offset_ms_estimate: Option<i64>,
    /// More than the maximum drift from a majority of the peers with samples.
    pub off: bool,
    /// Per peer: our clock minus the peer's, ms.
    pub peers: BTreeMap<String, i64>,
    /// Peers more than the maximum drift away.
    pub peers_off: usize,
}

/// The verdict from the offsets (ours minus theirs, ms) of the connected peers that have
/// samples, out of `connected` peers in all (a connected peer without a sample yet counts as
/// in sync), and the maximum drift.
pub fn judge(peers: BTreeMap<String, i64>, connected: usize, max_drift_ms: u64) -> ClockVerdict {
    let peers_off = peers
        .values()
        .filter(|offset| offset.unsigned_abs() > max_drift_ms)
        .count();
    let offsets: Vec<i64> = peers.values().copied().collect();
    ClockVerdict {
        offset_ms_estimate: peer_offset_ms(&offsets),
        // A strict majority: with two peers both must disagree, so one peer whose own clock is
        // off does not make this node think it is the one (nor does the first peer heard of
        // while the others' samples are still on their way).
        off: peers_off * 2 > connected.max(peers.len()),
        peers,
        peers_off,
    }
}

/// Whether a condition (`now_true` at `now`) has held without a break for `hold`;
/// `since` keeps when it began.
pub fn sustained(
    since: &mut Option<Instant>,
    now_true: bool,
    now: Instant,
    hold: Duration,
) -> bool {
    *since = if now_true {
        Some(since.unwrap_or(now))
    } else {
        None
    };
    since.is_some_and(|t| now.saturating_duration_since(t) >= hold)
}

/// A lock poisoned by a panic elsewhere is taken anyway: the samples stay consistent between
/// statements. (Not `crate::sync`: this module imports nothing of the node.)
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The recent clock samples of every peer, shared by the link tasks that receive them.
#[derive(Debug, Default)]
pub struct ClockWatch {
    samples: Mutex<BTreeMap<String, VecDeque<(Instant, i64)>>>,
}

impl ClockWatch {
    /// Keep `sample` of `peer`, received at `at`. A peer reading of 0 means "unknown" and is
    /// ignored.
    pub fn record(&self, peer: &str, sample: ClockSample, at: Instant) {
        if sample.peer_ntp64 == 0 {
            return;
        }
        let offset = sample_offset_ms(&sample);
        let mut all = lock(&self.samples);
        if !all.contains_key(peer) && all.len() >= MAX_TRACKED_PEERS {
            return;
        }
        let kept = all.entry(peer.to_string()).or_default();
        if kept.len() >= SAMPLES_PER_PEER {
            kept.pop_front();
        }
        kept.push_back((at, offset));
    }

    /// Each peer's offset from its samples younger than `max_age` at `now`.
    pub fn peer_offsets(&self, now: Instant, max_age: Duration) -> BTreeMap<String, i64> {
        let all = lock(&self.samples);
        all.iter()
            .filter_map(|(peer, kept)| {
                let fresh: Vec<i64> = kept
                    .iter()
                    .filter(|(at, _)| now.saturating_duration_since(*at) <= max_age)
                    .map(|(_, offset)| *offset)
                    .collect();
                peer_offset_ms(&fresh).map(|offset| (peer.clone(), offset))
            })
            .collect()
    }

    /// The verdict at `now` from the samples younger than `max_age` of the `connected` peers.
    pub fn verdict(
        &self,
        now: Instant,
        max_age: Duration,
        connected: &[String],
        max_drift_ms: u64,
    ) -> ClockVerdict {
        let mut offsets = self.peer_offsets(now, max_age);
        offsets.retain(|peer, _| connected.contains(peer));
        judge(offsets, connected.len(), max_drift_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND_NTP64: u64 = 1 << 32;
    const T: u64 = 1_700_000_000 * SECOND_NTP64;

    fn ms(n: u64) -> u64 {
        n * SECOND_NTP64 / 1000
    }

    fn one_way(peer: u64, received: u64) -> ClockSample {
        ClockSample {
            peer_ntp64: peer,
            local_sent_ntp64: None,
            local_received_ntp64: received,
        }
    }

    #[test]
    fn a_sample_is_our_clock_minus_the_peers() {
        // We are 10 s ahead; the message took 20 ms.
        let ahead = one_way(T, T + ms(10_020));
        assert_eq!(sample_offset_ms(&ahead), 10_020);
        let behind = one_way(T + ms(10_000), T + ms(20));
        assert_eq!(sample_offset_ms(&behind), -9_980);
        // A reply: the peer read its clock at the midpoint of our 400 ms round trip, and its
        // clock equals ours: the delay cancels out.
        let reply = ClockSample {
            peer_ntp64: T + ms(200),
            local_sent_ntp64: Some(T),
            local_received_ntp64: T + ms(400),
        };
        assert_eq!(sample_offset_ms(&reply), 0);
        // Extremes saturate instead of wrapping.
        assert!(sample_offset_ms(&one_way(u64::MAX, 0)) < 0);
        assert!(sample_offset_ms(&one_way(1, u64::MAX)) > 0);
    }

    #[test]
    fn a_peers_offset_is_the_median_of_its_samples() {
        assert_eq!(peer_offset_ms(&[]), None);
        assert_eq!(peer_offset_ms(&[7]), Some(7));
        assert_eq!(peer_offset_ms(&[10_000, 10_010, 9_000_000]), Some(10_010));
        assert_eq!(peer_offset_ms(&[3, 1, 2, 100]), Some(2));
    }

    fn peers(offsets: &[(&str, i64)]) -> BTreeMap<String, i64> {
        offsets.iter().map(|(p, o)| (p.to_string(), *o)).collect()
    }

    #[test]
    fn off_means_beyond_the_drift_from_a_strict_majority_of_peers() {
        // The skewed node of three: both peers see it 10 s ahead.
        let skewed = judge(peers(&[("b", 10_000), ("c", 9_990)]), 2, 500);
        assert!(skewed.off);
        assert_eq!(skewed.offset_ms_estimate, Some(9_990));
        assert_eq!(skewed.peers_off, 2);
        // One of its peers: one of two peers is off, so it is not.
        let peer = judge(peers(&[("a", -10_000), ("c", 3)]), 2, 500);
        assert!(!peer.off);
        assert_eq!(peer.peers_off, 1);
        // The same peer first heard of, the other still connecting: not a majority either.
        assert!(!judge(peers(&[("a", -10_000)]), 2, 500).off);
        // The only peer decides.
        assert!(judge(peers(&[("a", -600)]), 1, 500).off);
        assert!(
            !judge(peers(&[("a", -500)]), 1, 500).off,
            "at the drift is within it"
        );
        // Two of three.
        assert!(judge(peers(&[("a", 900), ("b", -900), ("c", 0)]), 3, 500).off);
        // No samples: nothing known, nothing off.
        let none = judge(BTreeMap::new(), 2, 500);
        assert!(!none.off);
        assert_eq!(none.offset_ms_estimate, None);
    }

    #[test]
    fn an_alarm_needs_the_verdict_to_last() {
        let (t0, hold) = (Instant::now(), Duration::from_secs(10));
        let mut since = None;
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!sustained(&mut since, true, at(0), hold));
        assert!(!sustained(&mut since, true, at(9), hold));
        assert!(sustained(&mut since, true, at(10), hold));
        // One "in sync" breaks it; the count starts over.
        assert!(!sustained(&mut since, false, at(11), hold));
        assert!(!sustained(&mut since, true, at(12), hold));
        assert!(!sustained(&mut since, true, at(21), hold));
        assert!(sustained(&mut since, true, at(22), hold));
    }

    #[test]
    fn the_watch_keeps_recent_samples_per_peer_and_forgets_old_ones() {
        let watch = ClockWatch::default();
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        // An old sample saying "ahead", then recent ones saying "in sync".
        watch.record("b", one_way(T, T + ms(10_000)), t0);
        for i in 1..=3 {
            watch.record(
                "b",
                one_way(T, T + ms(2)),
                t0 + hour + Duration::from_secs(i),
            );
        }
        // Unknown readings say nothing.
        watch.record("c", one_way(0, T), t0 + hour);
        let now = t0 + hour + Duration::from_secs(10);
        let connected = ["b".to_string(), "c".to_string()];
        let verdict = watch.verdict(now, Duration::from_secs(600), &connected, 500);
        assert_eq!(verdict.peers, peers(&[("b", 2)]));
        assert!(!verdict.off);
        // Within the age limit the old sample counts, but the median of four is still in sync.
        assert_eq!(watch.peer_offsets(now, 2 * hour), peers(&[("b", 2)]));
        // Only the newest SAMPLES_PER_PEER are kept.
        for i in 0..(SAMPLES_PER_PEER as u64 + 5) {
            watch.record(
                "b",
                one_way(T, T + ms(10_000)),
                now + Duration::from_secs(i),
            );
        }
        let later = now + Duration::from_secs(60);
        assert_eq!(watch.peer_offsets(later, 2 * hour), peers(&[("b", 10_000)]));
        // b alone is off: not a majority of the two connected; with c gone, it is.
        assert!(!watch.verdict(later, 2 * hour, &connected, 500).off);
        assert!(watch.verdict(later, 2 * hour, &connected[..1], 500).off);
        // A peer no longer connected does not count.
        assert!(watch.verdict(later, 2 * hour, &[], 500).peers.is_empty());
        let kept = lock(&watch.samples)["b"].len();
        assert_eq!(kept, SAMPLES_PER_PEER);
    }
}
