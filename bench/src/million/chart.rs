//! The run's chart: memory per connection (relay, holders, kernel) and the
//! handshake rate of each ramp step, against connections, as SVG for
//! docs/benchmarks.md. Text is left to the viewer (no font is rasterised).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::Step;

/// A line of the memory chart: its label, colour and value per step.
type Series = (&'static str, RGBColor, fn(&Step) -> f64);

pub fn draw(path: &Path, steps: &[Step]) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(480);
    let x_max = steps.iter().map(|s| s.subscribed).max().unwrap_or(1) as f64 * 1.05;

    let mem_max = steps
        .iter()
        .flat_map(|s| {
            [
                s.relay_rss_per_conn,
                s.holder_rss_per_conn,
                s.kernel_slab_per_conn,
            ]
        })
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = panel(
        &left,
        "Memory per connection (bytes)",
        "connections",
        x_max,
        mem_max,
    )?;
    let series: [Series; 3] = [
        ("kernel slab, both ends", RGBColor(31, 119, 180), |s| {
            s.kernel_slab_per_conn
        }),
        ("relay RSS", RGBColor(214, 39, 40), |s| s.relay_rss_per_conn),
        ("holder RSS", RGBColor(44, 160, 44), |s| {
            s.holder_rss_per_conn
        }),
    ];
    for (label, colour, value) in series {
        let points = steps
            .iter()
            .map(|s| (s.subscribed as f64, value(s)))
            .collect();
        line(&mut chart, points, colour, Some(label))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleRight)
        .draw()
        .map_err(|e| err(&e))?;

    let rate_max = steps
        .iter()
        .map(|s| s.handshakes_per_sec)
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = panel(
        &right,
        "Handshakes per second during each ramp step",
        "connections at the end of the step",
        x_max,
        rate_max,
    )?;
    let points = steps
        .iter()
        .map(|s| (s.subscribed as f64, s.handshakes_per_sec))
        .collect();
    line(&mut chart, points, RGBColor(214, 39, 40), None)?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Panel<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One half of the chart: a caption, axes from 0 and thousands of
/// connections along x.
fn panel<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    x_max: f64,
    y_max: f64,
) -> Result<Panel<'a>> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing the chart: {e}");
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    Ok(chart)
}

/// A line through `points` with a dot on each, in the legend as `label`.
fn line(
    chart: &mut Panel,
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    label: Option<&'static str>,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing the chart: {e}");
    let drawn = chart
        .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
        .map_err(|e| err(&e))?;
    if let Some(label) = label {
        drawn.label(label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
        });
    }
    chart
        .draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, colour.filled())),
        )
        .map_err(|e| err(&e))?;
    Ok(())
}
