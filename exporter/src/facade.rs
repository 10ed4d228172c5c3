//! Publishing the exporter's metrics through the `metrics` facade (feature `metrics`), for
//! services that expose metrics with `metrics-exporter-prometheus` or another recorder instead
//! of the `prometheus` crate.
//!
//! On every refresh, each gauge and counter of the exporter's registry is set through the
//! installed recorder under the same name and labels as on `/metrics` (counters with
//! `absolute`, so the recorder holds the same monotonic value). `process_*` families are left
//! out: `metrics-process` is the facade's way to get them, and two writers of one name would
//! fight.

use prometheus::proto::MetricType;

/// Sets every family of `registry` (but `process_*`) through the `metrics` facade.
pub(crate) fn publish(registry: &prometheus::Registry) {
    for family in registry.gather() {
        let name = family.name();
        if name.starts_with("process_") {
            continue;
        }
        let kind = family.get_field_type();
        match kind {
            MetricType::COUNTER => {
                metrics::describe_counter!(name.to_owned(), family.help().to_owned())
            }
            MetricType::GAUGE => {
                metrics::describe_gauge!(name.to_owned(), family.help().to_owned())
            }
            _ => continue,
        }
        for metric in family.get_metric() {
            let labels: Vec<metrics::Label> = metric
                .get_label()
                .iter()
                .map(|l| metrics::Label::new(l.name().to_owned(), l.value().to_owned()))
                .collect();
            if kind == MetricType::COUNTER {
                let value = metric.get_counter().get_value();
                metrics::counter!(name.to_owned(), labels).absolute(value as u64);
            } else {
                metrics::gauge!(name.to_owned(), labels).set(metric.get_gauge().get_value());
            }
        }
    }
}
