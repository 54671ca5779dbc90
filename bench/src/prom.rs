//! Just enough of the Prometheus / OpenMetrics text format to read a node's counters and
//! histograms, and quantiles from the difference of two histogram scrapes.

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn matches(&self, name: &str, filter: &[(&str, &str)]) -> bool {
        self.name == name && filter.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Result<Scrape> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let s = parse_line(line).ok_or_else(|| {
                Error::runtime(format!("cannot parse metrics line {}: {line}", n + 1))
            })?;
            samples.push(s);
        }
        Ok(Scrape { samples })
    }

    /// The value of the first sample named `name` whose labels include `filter`.
    pub fn value(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.matches(name, filter))
            .map(|s| s.value)
    }

    /// A histogram's cumulative buckets `(le, count)` sorted by `le` (+Inf last), plus its
    /// `_sum` and `_count`. `base` is the name without `_bucket`.
    pub fn histogram(&self, base: &str, filter: &[(&str, &str)]) -> Option<Buckets> {
        let bucket_name = format!("{base}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.matches(&bucket_name, filter))
            .filter_map(|s| Some((parse_le(s.label("le")?)?, s.value)))
            .collect();
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Buckets {
            buckets,
            sum: self.value(&format!("{base}_sum"), filter).unwrap_or(0.0),
            count: self.value(&format!("{base}_count"), filter).unwrap_or(0.0),
        })
    }
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        // Label values may hold escaped quotes, backslashes and newlines.
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                end = start + 1;
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key.trim().to_string(), value));
        }
        &body[end..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Cumulative histogram buckets as scraped.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// `(upper bound, cumulative count)`, sorted; the last bound is +Inf.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Buckets {
    /// The observations made between `before` and `self` (same bucket layout).
    pub fn since(&self, before: Option<&Buckets>) -> Result<Buckets> {
        let Some(before) = before else {
            return Ok(self.clone());
        };
        if before.buckets.len() != self.buckets.len()
            || before
                .buckets
                .iter()
                .zip(&self.buckets)
                .any(|(a, b)| a.0 != b.0)
        {
            return Err(Error::runtime(
                "the histogram's buckets changed between two scrapes (did the node restart?)",
            ));
        }
        Ok(Buckets {
            buckets: self
                .buckets
                .iter()
                .zip(&before.buckets)
                .map(|(a, b)| (a.0, a.1 - b.1))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        })
    }

    pub fn total(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The `q` quantile, linearly interpolated inside its bucket (the first bucket's lower
    /// bound is 0). `None` without observations. A quantile in the +Inf bucket answers the
    /// largest finite bound with `above_last_bound` set.
    pub fn quantile(&self, q: f64) -> Option<Quantile> {
        let total = self.total();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, cum) in &self.buckets {
            if cum >= rank && cum > below {
                if le.is_infinite() {
                    return Some(Quantile {
                        value: lower,
                        bucket_low: lower,
                        bucket_high: le,
                        above_last_bound: true,
                    });
                }
                let frac = (rank - below) / (cum - below);
                return Some(Quantile {
                    value: lower + (le - lower) * frac,
                    bucket_low: lower,
                    bucket_high: le,
                    above_last_bound: false,
                });
            }
            lower = le;
            below = cum;
        }
        None
    }

    /// The upper bound of the highest bucket holding an observation.
    pub fn max_bucket_bound(&self) -> Option<f64> {
        let mut prev = 0.0;
        let mut bound = None;
        for &(le, cum) in &self.buckets {
            if cum > prev {
                bound = Some(le);
            }
            prev = cum;
        }
        bound
    }

    /// The fraction of observations at or below `x`, linearly interpolated inside the
    /// bucket holding `x`. `None` without observations.
    pub fn fraction_le(&self, x: f64) -> Option<f64> {
        let total = self.total();
        if total <= 0.0 {
            return None;
        }
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, cum) in &self.buckets {
            if x <= le {
                if le.is_infinite() {
                    return Some(below / total);
                }
                let frac = ((x - lower) / (le - lower)).clamp(0.0, 1.0);
                return Some((below + (cum - below) * frac) / total);
            }
            lower = le;
            below = cum;
        }
        Some(1.0)
    }

    /// Ratio between consecutive finite bucket bounds (e.g. 1.25), if they grow geometrically.
    pub fn growth(&self) -> Option<f64> {
        let finite: Vec<f64> = self
            .buckets
            .iter()
            .map(|b| b.0)
            .filter(|b| b.is_finite())
            .collect();
        (finite.len() >= 2 && finite[0] > 0.0).then(|| finite[1] / finite[0])
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Quantile {
    pub value: f64,
    pub bucket_low: f64,
    pub bucket_high: f64,
    pub above_last_bound: bool,
}

/// `GET {base}/metrics`, parsed.
pub async fn scrape(http: &reqwest::Client, base: &str) -> Result<Scrape> {
    let url = format!("{base}/metrics");
    let resp = http
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| Error::runtime(format!("GET {url}: {}", crate::http::error_chain(&e))))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| {
        Error::runtime(format!(
            "GET {url}: reading the answer: {}",
            crate::http::error_chain(&e)
        ))
    })?;
    if !status.is_success() {
        return Err(Error::runtime(format!("GET {url} answered {status}")));
    }
    Scrape::parse(&text)
}

/// A node's group commits between two scrapes, from its own metrics.
#[derive(Debug, Clone, Serialize)]
pub struct CommitStats {
    /// Durable commits (local writes and applied replication batches share the writer).
    pub commits: u64,
    pub commits_per_sec: f64,
    /// Items (records) per commit, on average.
    pub mean_batch: Option<f64>,
    /// Commit duration, fsync included; the node's buckets double (50 µs, 100 µs, …), so these
    /// are coarse.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// Fraction of the interval the writer thread spent committing.
    pub busy_fraction: Option<f64>,
}

impl CommitStats {
    /// Between `before` (None: since the process started) and `after`, `secs` apart.
    pub fn between(before: Option<&Scrape>, after: &Scrape, secs: f64) -> Option<CommitStats> {
        let dur = after.histogram("meridian_commit_duration_seconds", &[])?;
        let dur = dur
            .since(
                before
                    .and_then(|b| b.histogram("meridian_commit_duration_seconds", &[]))
                    .as_ref(),
            )
            .ok()?;
        let batch = after
            .histogram("meridian_commit_batch_writes", &[])
            .and_then(|a| {
                a.since(
                    before
                        .and_then(|b| b.histogram("meridian_commit_batch_writes", &[]))
                        .as_ref(),
                )
                .ok()
            });
        let commits = dur.count.max(0.0);
        Some(CommitStats {
            commits: commits as u64,
            commits_per_sec: if secs > 0.0 { commits / secs } else { 0.0 },
            mean_batch: batch.filter(|b| b.count > 0.0).map(|b| b.sum / b.count),
            p50_ms: dur.quantile(0.5).map(|q| q.value * 1000.0),
            p99_ms: dur.quantile(0.99).map(|q| q.value * 1000.0),
            mean_ms: (commits > 0.0).then(|| dur.sum / commits * 1000.0),
            busy_fraction: (secs > 0.0).then(|| dur.sum / secs),
        })
    }

    pub fn describe(&self) -> String {
        let ms = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.2}"));
        format!(
            "{:.0}/s, {} items each, p50 {} / p99 {} ms, busy {}",
            self.commits_per_sec,
            self.mean_batch
                .map_or_else(|| "?".into(), |b| format!("{b:.1}")),
            ms(self.p50_ms),
            ms(self.p99_ms),
            self.busy_fraction
                .map_or_else(|| "?".into(), |b| format!("{:.0} %", b * 100.0))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP meridian_replication_changes_applied Received changes applied to records.
# TYPE meridian_replication_changes_applied counter
meridian_replication_changes_applied_total{peer_region="bench-a"} 1234
meridian_replication_changes_applied_total{peer_region="other"} 7
# TYPE meridian_replication_apply_lag_seconds histogram
meridian_replication_apply_lag_seconds_sum{peer_region="bench-a"} 0.5
meridian_replication_apply_lag_seconds_count{peer_region="bench-a"} 100
meridian_replication_apply_lag_seconds_bucket{le="0.001",peer_region="bench-a"} 10
meridian_replication_apply_lag_seconds_bucket{le="0.002",peer_region="bench-a"} 60
meridian_replication_apply_lag_seconds_bucket{le="0.004",peer_region="bench-a"} 99
meridian_replication_apply_lag_seconds_bucket{le="+Inf",peer_region="bench-a"} 100
weird{a="x\"y,z}",b="2"} 3.5
# EOF
"#;

    #[test]
    fn parses_counters_and_labels() {
        let s = Scrape::parse(TEXT).unwrap();
        assert_eq!(
            s.value(
                "meridian_replication_changes_applied_total",
                &[("peer_region", "bench-a")]
            ),
            Some(1234.0)
        );
        assert_eq!(s.value("weird", &[("a", "x\"y,z}")]), Some(3.5));
        assert_eq!(s.value("weird", &[("b", "2")]), Some(3.5));
        assert_eq!(s.value("missing", &[]), None);
    }

    #[test]
    fn interpolates_quantiles() {
        let s = Scrape::parse(TEXT).unwrap();
        let h = s
            .histogram(
                "meridian_replication_apply_lag_seconds",
                &[("peer_region", "bench-a")],
            )
            .unwrap();
        assert_eq!(h.count, 100.0);
        assert_eq!(h.total(), 100.0);
        // 50th of 100: bucket (0.001, 0.002] holds ranks 10..60; 40/50 of the way.
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50.value - 0.0018).abs() < 1e-12, "{p50:?}");
        // 10th: exactly the top of the first bucket.
        assert!((h.quantile(0.1).unwrap().value - 0.001).abs() < 1e-12);
        // 99.9th is in the +Inf bucket.
        let p999 = h.quantile(0.999).unwrap();
        assert!(p999.above_last_bound);
        assert_eq!(p999.value, 0.004);
        assert_eq!(h.max_bucket_bound(), Some(f64::INFINITY));
        assert_eq!(h.fraction_le(0.002), Some(0.6));
        assert!((h.fraction_le(0.0015).expect("observations") - 0.35).abs() < 1e-12);
        assert_eq!(h.fraction_le(10.0), Some(0.99));
        assert_eq!(h.growth(), Some(2.0));
    }

    #[test]
    fn differences_of_scrapes() {
        let before = Buckets {
            buckets: vec![(1.0, 5.0), (2.0, 5.0), (f64::INFINITY, 5.0)],
            sum: 2.0,
            count: 5.0,
        };
        let after = Buckets {
            buckets: vec![(1.0, 5.0), (2.0, 15.0), (f64::INFINITY, 15.0)],
            sum: 17.0,
            count: 15.0,
        };
        let d = after.since(Some(&before)).unwrap();
        assert_eq!(d.total(), 10.0);
        let q = d.quantile(0.5).unwrap();
        assert!((q.value - 1.5).abs() < 1e-12);
        assert_eq!(q.bucket_low, 1.0);
        assert_eq!(d.max_bucket_bound(), Some(2.0));
        assert!(
            Buckets {
                buckets: vec![],
                sum: 0.0,
                count: 0.0
            }
            .quantile(0.5)
            .is_none()
        );
        let other = Buckets {
            buckets: vec![(3.0, 1.0), (f64::INFINITY, 1.0)],
            sum: 0.0,
            count: 1.0,
        };
        assert!(after.since(Some(&other)).is_err());
    }
}
