//! What a scenario measured, printed as a two-column table or as one JSON object.
//!
//! A scenario fills both forms as it goes: `row` for the table, `field` for JSON (the
//! JSON field names are a contract with scripts such as `benches/peers/run.sh`).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

use super::proc_stats::{HostCpu, ProcSample};

pub struct Report {
    title: String,
    rows: Vec<(String, String)>,
    fields: Map<String, Value>,
    /// Problems and remarks, under the table and in JSON as `notes`.
    notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, title: String) -> Report {
        let mut fields = Map::new();
        fields.insert("scenario".into(), Value::from(scenario));
        Report {
            title,
            rows: Vec::new(),
            fields,
            notes: Vec::new(),
        }
    }

    /// A line of the table.
    pub fn row(&mut self, label: &str, value: impl std::fmt::Display) {
        self.rows.push((label.to_string(), value.to_string()));
    }

    /// A field of the JSON object.
    pub fn field(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.insert(key.to_string(), value.into());
    }

    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// Server CPU time and RSS between two samples, normalised by `units` (e.g.
    /// deliveries) per million; rows, the fields `server_cpu_s`, `<per_million_field>`,
    /// `server_rss_mb` and `server_cpu_by_thread_s`. Nothing when the server's PID is
    /// unknown.
    pub fn server_cost(
        &mut self,
        before: Option<&ProcSample>,
        after: Option<&ProcSample>,
        units: u64,
        unit_name: &str,
        per_million_field: &str,
    ) {
        let (Some(before), Some(after)) = (before, after) else {
            self.row(
                "server CPU / RSS",
                "unknown (server PID not known; see --server-pid)",
            );
            self.field(per_million_field, Value::Null);
            self.field("server_rss_mb", Value::Null);
            return;
        };
        let cpu = (after.cpu_s - before.cpu_s).max(0.0);
        let per_million = if units > 0 {
            cpu / (units as f64 / 1e6)
        } else {
            f64::NAN
        };
        self.row("server CPU", format!("{cpu:.2} s"));
        self.row(
            &format!("server CPU per 1M {unit_name}"),
            format!("{per_million:.2} s"),
        );
        self.row("server RSS at end", format!("{:.1} MiB", after.rss_mb));
        self.field("server_cpu_s", round(cpu, 3));
        self.field(per_million_field, finite(round(per_million, 3)));
        self.field("server_rss_mb", round(after.rss_mb, 1));
        let threads = after.thread_cpu_since(before);
        if !threads.is_empty() {
            let shown: Vec<String> = threads
                .iter()
                .take(6)
                .map(|(name, s)| format!("{name} {s:.2}"))
                .collect();
            self.row("server CPU by thread (s)", shown.join(", "));
            let map: Map<String, Value> = threads
                .into_iter()
                .map(|(name, s)| (name, Value::from(round(s, 3))))
                .collect();
            self.field("server_cpu_by_thread_s", Value::Object(map));
        }
    }

    /// The load generator's CPU (this process) and the machine's over a run, beside
    /// the server's: `generator_cpu_s_per_million_<unit>`, `host_busy` (the share of
    /// all cores' time spent running anything) and `host_steal` (the share the
    /// hypervisor took). With the generator on the same cores, a host near 1.0 busy
    /// means the run was bound by CPU; well under it, by waiting (commits, a pipeline).
    pub fn generator_and_host(
        &mut self,
        generator_cpu_s: Option<f64>,
        host: Option<HostCpu>,
        units: u64,
        unit_name: &str,
    ) {
        if let Some(cpu) = generator_cpu_s {
            // As for the server's: no figure per op when nothing was answered.
            let per_million = if units > 0 {
                cpu / (units as f64 / 1e6)
            } else {
                f64::NAN
            };
            self.row(
                "generator CPU (this process)",
                format!("{cpu:.2} s, {per_million:.2} s per 1M {unit_name}"),
            );
            self.field(
                &format!("generator_cpu_s_per_million_{unit_name}"),
                finite(round(per_million, 3)),
            );
        }
        if let Some(host) = host.filter(|host| host.total_s > 0.0) {
            let busy = host.busy_s / host.total_s;
            let steal = host.steal_s / host.total_s;
            self.row(
                "host CPU",
                format!(
                    "{:.0}% busy, {:.0}% stolen by the hypervisor",
                    busy * 100.0,
                    steal * 100.0
                ),
            );
            self.field("host_busy", round(busy, 3));
            self.field("host_steal", round(steal, 3));
        }
    }

    pub fn table(&self) -> String {
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.title);
        for (label, value) in &self.rows {
            let _ = writeln!(out, "  {label:<width$}  {value}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }

    pub fn json(&self) -> String {
        let mut fields = self.fields.clone();
        fields.insert("notes".into(), Value::from(self.notes.clone()));
        Value::Object(fields).to_string()
    }
}

/// Quantiles of a histogram in microseconds, as milliseconds.
pub fn latency_ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    if histogram.is_empty() {
        return f64::NAN;
    }
    let micros = if quantile >= 1.0 {
        histogram.max()
    } else {
        histogram.value_at_quantile(quantile)
    };
    micros as f64 / 1000.0
}

/// A JSON object `{name: ms}` for the given quantiles (`max` for 1.0).
pub fn latency_json(histogram: &Histogram<u64>, quantiles: &[(&str, f64)]) -> Value {
    let map: Map<String, Value> = quantiles
        .iter()
        .map(|(name, q)| {
            (
                name.to_string(),
                finite(round(latency_ms(histogram, *q), 3)),
            )
        })
        .collect();
    Value::Object(map)
}

/// `p50 1.2 / p99 3.4 / max 5.6 ms` for the table.
pub fn latency_row(histogram: &Histogram<u64>, quantiles: &[(&str, f64)]) -> String {
    let parts: Vec<String> = quantiles
        .iter()
        .map(|(name, q)| format!("{name} {:.2}", latency_ms(histogram, *q)))
        .collect();
    format!("{} ms", parts.join(" / "))
}

/// An empty latency histogram in microseconds, from 1 µs to 10 minutes, 3 digits.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// JSON has no NaN: unknown numbers are null.
fn finite(value: f64) -> Value {
    if value.is_finite() {
        Value::from(value)
    } else {
        Value::Null
    }
}

/// `12.3k` style numbers for the table.
pub fn si(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}
