//! Reads the Prometheus text exposition (what `/metrics` serves) back into samples, so
//! `/admin/status` carries every metric by name, whatever metrics exist in this build: the page
//! sums, differentiates and reads histogram buckets itself.

use std::collections::BTreeMap;

use serde::Serialize;

/// One sample: its labels and value (`None` for NaN and infinities, which JSON cannot carry).
#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct Sample {
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: Option<f64>,
}

/// The samples of an exposition, by sample name (`x`, `x_bucket`, `x_sum`, …), and the type each
/// family declared (`# TYPE x histogram`).
#[derive(Debug, Default, Serialize)]
pub(crate) struct Exposition {
    pub(crate) samples: BTreeMap<String, Vec<Sample>>,
    pub(crate) types: BTreeMap<String, String>,
}

/// Parses `text`; lines that are not samples or `# TYPE` comments are skipped, as is a sample line
/// that does not parse.
pub(crate) fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            if words.next() == Some("TYPE")
                && let (Some(name), Some(kind)) = (words.next(), words.next())
            {
                out.types.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if let Some((name, sample)) = sample(line) {
            out.samples.entry(name).or_default().push(sample);
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// `name{l="v",…} value [timestamp]`.
fn sample(line: &str) -> Option<(String, Sample)> {
    let end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = label_set(after, &mut labels)?;
    }
    let value = rest.split_whitespace().next()?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((
        name.to_string(),
        Sample {
            labels,
            value: value.is_finite().then_some(value),
        },
    ))
}

/// Reads `l="v",…}` into `labels`; the text after the closing brace.
fn label_set<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Option<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some(after);
        }
        let end = s.find(|c: char| !is_name_char(c))?;
        let key = &s[..end];
        s = s[end..].trim_start().strip_prefix('=')?;
        s = s.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        if key.is_empty() {
            return None;
        }
        labels.insert(key.to_string(), value);
        s = s[close + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_are_read_by_sample_name() {
        let text = "# HELP herald_sessions open sessions\n\
                    # TYPE herald_sessions gauge\n\
                    herald_sessions{transport=\"ws\"} 3\n\
                    herald_sessions{transport=\"sse\"} 1\n\
                    # TYPE herald_deliveries_total counter\n\
                    herald_deliveries_total 12345 1700000000000\n\
                    # TYPE herald_publish_duration_seconds histogram\n\
                    herald_publish_duration_seconds_bucket{le=\"0.001\"} 4\n\
                    herald_publish_duration_seconds_bucket{le=\"+Inf\"} 5\n\
                    herald_publish_duration_seconds_sum 0.0123\n\
                    herald_publish_duration_seconds_count 5\n\
                    odd{q=\"a \\\"quoted\\\" \\\\ \\n line\",} NaN\n";
        let e = parse(text);
        assert_eq!(e.types["herald_sessions"], "gauge");
        assert_eq!(e.types["herald_publish_duration_seconds"], "histogram");
        let s = &e.samples["herald_sessions"];
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["transport"], "ws");
        assert_eq!(s[0].value, Some(3.0));
        assert_eq!(e.samples["herald_deliveries_total"][0].value, Some(12345.0));
        let b = &e.samples["herald_publish_duration_seconds_bucket"];
        assert_eq!(b[1].labels["le"], "+Inf");
        assert_eq!(b[1].value, Some(5.0));
        assert_eq!(
            e.samples["herald_publish_duration_seconds_sum"][0].value,
            Some(0.0123)
        );
        let odd = &e.samples["odd"][0];
        assert_eq!(odd.labels["q"], "a \"quoted\" \\ \n line");
        assert_eq!(odd.value, None, "NaN is not a JSON number");
    }

    #[test]
    fn lines_that_do_not_parse_are_skipped_without_a_panic() {
        let text = "garbage\n{x=\"1\"} 2\nm{unclosed=\"v} 1\nm{a=b} 1\nm{a=\"1\" b=\"2\"} 1\n\
                    1m 3\nm notanumber\nm{a=\"1\"}\nok 7\n# TYPE\n# TYPE only\nm{\u{e9}=\"x\"} 1\n";
        let e = parse(text);
        assert_eq!(e.samples.len(), 1, "{e:?}");
        assert_eq!(e.samples["ok"][0].value, Some(7.0));
        assert!(e.types.is_empty());
    }
}
