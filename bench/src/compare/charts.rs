//! SVG charts of a comparison, drawn with `plotters` into `docs/charts/`
//! and embedded in `docs/benchmarks.md`: throughput, latency at the common
//! rate, memory per idle connection and connection setup rate, one bar per
//! contender in each group. The figures are the report's medians.
//!
//! Text is left to the SVG viewer (no font is rasterised), so the charts
//! need no font files on the machine that makes them.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One group of bars (a workload, or a percentile) and each contender's
/// value in it; `None` draws no bar.
pub struct Group {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

pub struct Chart<'a> {
    /// File name under `docs/charts/`.
    pub file: &'a str,
    pub title: &'a str,
    pub y_label: &'a str,
    /// Logarithmic y axis: contenders differ by orders of magnitude.
    pub log: bool,
    pub contenders: &'a [String],
    pub groups: Vec<Group>,
}

const SIZE: (u32, u32) = (960, 440);

/// A colour per contender, in report order (ringcast first), stable across
/// charts.
fn colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 8] = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLOURS[i % COLOURS.len()]
}

/// 1,234,567 as "1.2M": bar and axis labels must stay short.
pub fn compact(v: f64) -> String {
    let a = v.abs();
    let (x, unit) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if x.abs() >= 100.0 || (x - x.round()).abs() < 0.05 {
        format!("{x:.0}{unit}")
    } else {
        format!("{x:.1}{unit}")
    }
}

/// Draws `chart` into `dir/<file>`; false (and no file, an older one is
/// removed) when it has no value at all.
pub fn draw(dir: &Path, chart: &Chart) -> Result<bool> {
    let values: Vec<f64> = chart
        .groups
        .iter()
        .flat_map(|g| g.values.iter().flatten().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let path = dir.join(chart.file);
    if values.is_empty() {
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        return Ok(false);
    }
    let root = SVGBackend::new(&path, SIZE).into_drawing_area();
    plot(&root, chart, &values)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))?;
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn plot(root: &DrawingArea<SVGBackend, Shift>, chart: &Chart, values: &[f64]) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    let groups = chart.groups.len();
    let x_range = -0.5..groups as f64 - 0.5;
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64);
    if chart.log {
        let lo = 10f64.powf(min.log10().floor());
        let hi = 10f64.powf((max * 1.5).log10().ceil());
        let mut c = builder.build_cartesian_2d(x_range, (lo..hi).log_scale())?;
        axes_bars_legend(&mut c, chart, lo)
    } else {
        let mut c = builder.build_cartesian_2d(x_range, 0.0..max * 1.15)?;
        axes_bars_legend(&mut c, chart, 0.0)
    }
}

/// Axes, bars from `base` up, and the legend, on either kind of y axis.
fn axes_bars_legend<'a, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    chart: &Chart,
    base: f64,
) -> DrawResult<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let groups = chart.groups.len();
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .x_label_formatter(&|x| group_label(chart, *x))
        .y_desc(chart.y_label)
        .y_label_formatter(&|y| compact(*y))
        .draw()?;
    bars(c, chart, base)?;
    legend(c)
}

/// The x axis has a key point per group, at the group's index.
fn group_label(chart: &Chart, x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    chart
        .groups
        .get(i as usize)
        .map_or(String::new(), |g| g.label.clone())
}

fn bars<'a, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    chart: &Chart,
    base: f64,
) -> DrawResult<()>
where
    Y: Ranged<ValueType = f64>,
{
    let n = chart.contenders.len().max(1) as f64;
    let width = 0.8 / n;
    for (j, name) in chart.contenders.iter().enumerate() {
        let colour = colour(j);
        let mut rects = Vec::new();
        let mut labels = Vec::new();
        for (i, g) in chart.groups.iter().enumerate() {
            let Some(v) = g.values.get(j).copied().flatten() else {
                continue;
            };
            if !v.is_finite() || v <= 0.0 {
                continue;
            }
            let left = i as f64 - 0.4 + j as f64 * width;
            rects.push(Rectangle::new(
                [(left, base), (left + width * 0.9, v)],
                colour.filled(),
            ));
            labels.push(Text::new(
                compact(v),
                (left + width * 0.45, v),
                ("sans-serif", 10)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            ));
        }
        c.draw_series(rects)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        c.draw_series(labels)?;
    }
    Ok(())
}

fn legend<'a, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
) -> DrawResult<()>
where
    Y: Ranged<ValueType = f64>,
{
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_numbers() {
        assert_eq!(compact(2_627_366.0), "2.6M");
        assert_eq!(compact(150_792.0), "151k");
        assert_eq!(compact(1_990.0), "2k");
        assert_eq!(compact(12.34), "12.3");
        assert_eq!(compact(99.0), "99");
    }

    #[test]
    fn a_chart_names_every_contender_and_group() {
        let dir = std::env::temp_dir().join(format!("ringcast-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let contenders = vec!["ringcast".to_string(), "node-ws".to_string()];
        let chart = Chart {
            file: "t.svg",
            title: "delivered messages/s",
            y_label: "msg/s",
            log: true,
            contenders: &contenders,
            groups: vec![
                Group {
                    label: "broadcast-1k-100b".into(),
                    values: vec![Some(2_600_000.0), Some(120_000.0)],
                },
                Group {
                    label: "many-channels".into(),
                    values: vec![Some(900_000.0), None],
                },
            ],
        };
        assert!(draw(&dir, &chart).unwrap());
        let svg = std::fs::read_to_string(dir.join("t.svg")).unwrap();
        for text in [
            "ringcast",
            "node-ws",
            "broadcast-1k-100b",
            "many-channels",
            "2.6M",
            "120k",
        ] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        let empty = Chart {
            file: "none.svg",
            groups: vec![Group {
                label: "x".into(),
                values: vec![None, None],
            }],
            ..chart
        };
        assert!(!draw(&dir, &empty).unwrap());
        assert!(!dir.join("none.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
