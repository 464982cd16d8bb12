//! Figures as data, and the chart drawn from them. Every table row the bench prints also
//! records its cells, one JSON line each, in the file `BENCH_RESULTS` names (`bench/report.sh`
//! sets it); `bench --chart RESULTS --chart-out SVG` draws them: one panel per unit, a
//! horizontal bar per scenario and target, so every figure in `docs/bench.md` has its picture.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Value, json};

/// Records one figure when `BENCH_RESULTS` names a file (appended: the report runs the bench
/// several times). `unit` decides the panel (see [`PANELS`]).
pub fn record(scenario: &str, target: &str, value: f64, unit: &str) {
    let Some(path) = std::env::var_os("BENCH_RESULTS") else {
        return;
    };
    let line = json!({"scenario": scenario, "target": target, "value": value, "unit": unit});
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("bench: cannot record a figure in {path:?}: {e}");
    }
}

struct Figure {
    scenario: String,
    target: String,
    value: f64,
}

/// Panels in the order drawn, with their titles.
const PANELS: [(&str, &str); 4] = [
    (
        "msg/s",
        "deliveries (or answered requests) per second — longer is better",
    ),
    (
        "µs",
        "broker CPU per delivered message, µs — shorter is better",
    ),
    ("ms", "latency p99 at 5k msg/s, ms — shorter is better"),
    ("KiB", "memory per idle connection, KiB — shorter is better"),
];

/// A colour per system, whatever the protocol: orange is always the gateway.
const COLOURS: [(&str, RGBColor); 6] = [
    ("gateway", RGBColor(0xd9, 0x5f, 0x02)),
    ("mosquitto", RGBColor(0x1b, 0x9e, 0x77)),
    ("nats", RGBColor(0x75, 0x70, 0xb3)),
    ("rumqttd", RGBColor(0xe7, 0x29, 0x8a)),
    ("rabbitmq", RGBColor(0x66, 0x66, 0x66)),
    ("axum", RGBColor(0x1f, 0x78, 0xb4)),
];

fn colour(target: &str) -> RGBColor {
    let target = target.to_lowercase();
    COLOURS
        .iter()
        .find(|(system, _)| target.contains(system))
        .map_or(RGBColor(0, 0, 0), |(_, c)| *c)
}

/// Draws the figures recorded in `results` into the SVG file `out`.
pub fn chart(results: &Path, out: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(results).map_err(|e| format!("{results:?}: {e}"))?;
    let mut panels: BTreeMap<&str, Vec<Figure>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        let (Some(scenario), Some(target), Some(value), Some(unit)) = (
            v["scenario"].as_str(),
            v["target"].as_str(),
            v["value"].as_f64(),
            v["unit"].as_str(),
        ) else {
            return Err(format!("not a figure: {line}"));
        };
        let Some((unit, _)) = PANELS.iter().find(|(u, _)| *u == unit) else {
            continue;
        };
        panels.entry(unit).or_default().push(Figure {
            scenario: scenario.to_owned(),
            target: target.to_owned(),
            value,
        });
    }
    let drawn: Vec<(&str, &Vec<Figure>)> = PANELS
        .iter()
        .filter_map(|(unit, title)| Some((*title, panels.get(unit)?)))
        .collect();
    if drawn.is_empty() {
        return Err(format!("no figures in {results:?}"));
    }
    const ROW: u32 = 18;
    const PANEL_EXTRA: u32 = 70;
    let heights: Vec<u32> = drawn
        .iter()
        .map(|(_, f)| f.len() as u32 * ROW + PANEL_EXTRA)
        .collect();
    let root = SVGBackend::new(out, (1000, heights.iter().sum())).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut rest = root;
    for ((title, figures), height) in drawn.into_iter().zip(heights) {
        let (area, below) = rest.split_vertically(height);
        rest = below;
        panel(&area, title, figures).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    figures: &[Figure],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let positive = figures.iter().map(|f| f.value).filter(|v| *v > 0.0);
    let lo = positive.clone().fold(f64::INFINITY, f64::min).max(1e-3) / 2.0;
    let hi = positive.fold(0.0, f64::max).max(lo * 4.0) * 3.0;
    let labels: Vec<String> = figures
        .iter()
        .map(|f| format!("{} · {}", f.scenario, f.target))
        .collect();
    let rows = figures.len() as u32;
    // The first figure on top: segments count upwards.
    let row = |i: u32| rows.saturating_sub(i + 1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(430)
        .build_cartesian_2d((lo..hi).log_scale(), (0..rows).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(8)
        .y_labels(rows as usize)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows
                .checked_sub(i + 1)
                .and_then(|r| labels.get(r as usize).cloned())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 12))
        .draw()?;
    chart.draw_series(figures.iter().enumerate().map(|(i, f)| {
        let i = row(i as u32);
        let mut bar = Rectangle::new(
            [
                (lo, SegmentValue::Exact(i)),
                (f.value.max(lo), SegmentValue::Exact(i + 1)),
            ],
            colour(&f.target).filled(),
        );
        bar.set_margin(2, 2, 0, 0);
        bar
    }))?;
    chart.draw_series(figures.iter().enumerate().map(|(i, f)| {
        Text::new(
            format!(" {}", short(f.value)),
            (f.value.max(lo), SegmentValue::CenterOf(row(i as u32))),
            TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
        )
    }))?;
    Ok(())
}

/// 1234567 → "1.23M", 0.0123 → "0.012".
fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v if v >= 10.0 => format!("{v:.0}"),
        v if v >= 1.0 => format!("{v:.1}"),
        v => format!("{v:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_draws_every_recorded_figure_in_its_panel() {
        let dir = std::env::temp_dir().join(format!("bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let results = dir.join("results.jsonl");
        let lines = [
            r#"{"scenario":"1→1 QoS 0","target":"gateway","value":321500,"unit":"msg/s"}"#,
            r#"{"scenario":"1→1 QoS 0","target":"nats","value":521800,"unit":"msg/s"}"#,
            r#"{"scenario":"idle MQTT × 1000","target":"mosquitto","value":0.98,"unit":"KiB"}"#,
            r#"{"scenario":"ignored","target":"gateway","value":1,"unit":"furlongs"}"#,
        ];
        std::fs::write(&results, lines.join("\n")).unwrap();
        let out = dir.join("chart.svg");
        chart(&results, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        for text in [
            "1→1 QoS 0 · gateway",
            "1→1 QoS 0 · nats",
            "idle MQTT × 1000 · mosquitto",
            "321.5k",
            "521.8k",
            "memory per idle connection",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(
            !svg.contains("ignored"),
            "a unit without a panel is left out"
        );
        assert!(
            !svg.contains("latency p99"),
            "a panel without figures is left out"
        );
        std::fs::write(&results, "not json").unwrap();
        assert!(chart(&results, &out).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
