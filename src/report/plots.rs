//! The report's PNGs, drawn with plotters on a bitmap. Text needs a font: DejaVu Sans (reduced
//! to ASCII and a few symbols, licence beside it) is compiled in, so plots look the same on any
//! machine and need no system fonts.
use super::{Metrics, ReportError};
use crate::units::gib;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const SIZE: (u32, u32) = (1100, 900);
/// More lines than this get no legend entries (a legend of 64 ranks hides the plot).
const MAX_LEGEND: usize = 12;

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

fn series(label: impl Into<String>, x: impl IntoIterator<Item = f64>, y: impl IntoIterator<Item = f64>) -> Series {
    let points = x.into_iter().zip(y).filter(|(_, y)| y.is_finite()).collect();
    Series { label: label.into(), points }
}

/// [lo, hi] of some values, widened a little (and made non-empty) so lines are not on the frame.
fn range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - pad * span, hi + pad * span)
}

/// A y tick label with just enough digits to tell ticks a fiftieth of the range apart.
fn tick_label(v: f64, lo: f64, hi: f64) -> String {
    let mag = lo.abs().max(hi.abs()).max(f64::MIN_POSITIVE);
    let step = ((hi - lo) / 50.0).max(mag * 1e-9);
    let significant = ((mag / step).log10().ceil() as i32).clamp(1, 8);
    if !(1e-2..1e5).contains(&mag) {
        format!("{:.*e}", (significant - 1) as usize, v)
    } else {
        format!("{:.*}", (significant - mag.log10().floor() as i32 - 1).max(0) as usize, v)
    }
}

/// One line chart in `area`.
/// Quantities (memory, throughput) start their axis at 0 so small differences do not look large.
fn panel(area: &DrawingArea<BitMapBackend, Shift>, p: &Panel) -> Result<(), String> {
    let Panel { title, x_desc, y_desc, lines, from_zero } = p;
    let (x0, x1) = range(lines.iter().flat_map(|s| s.points.iter().map(|p| p.0)), 0.0);
    let zero = from_zero.then_some(0.0);
    let (y0, y1) = range(lines.iter().flat_map(|s| s.points.iter().map(|p| p.1)).chain(zero), 0.05);
    let y0 = if *from_zero { 0.0 } else { y0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(*x_desc)
        .y_desc(*y_desc)
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .y_label_formatter(&|v| tick_label(*v, y0, y1))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    let legend = lines.len() > 1 && lines.len() <= MAX_LEGEND;
    for (i, s) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if legend {
            drawn
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            // Zero-based quantities run along the top; losses fall towards the bottom right.
            .position(if *from_zero { SeriesLabelPosition::LowerRight } else { SeriesLabelPosition::UpperRight })
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

struct Panel<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    lines: Vec<Series>,
    from_zero: bool,
}

fn p<'a>(title: &'a str, x_desc: &'a str, y_desc: &'a str, lines: Vec<Series>, from_zero: bool) -> Panel<'a> {
    Panel { title, x_desc, y_desc, lines, from_zero }
}

/// A PNG of vertically stacked panels.
fn figure(path: &Path, panels: &[Panel]) -> Result<PathBuf, ReportError> {
    let plot_err = |message: String| ReportError::Plot { path: path.display().to_string(), message };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    for (area, one) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        panel(area, one).map_err(plot_err)?;
    }
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(path.to_path_buf())
}

pub fn write_all(m: &Metrics, out: &Path) -> Result<Vec<PathBuf>, ReportError> {
    // Registering twice (a second report in one process) only replaces the same font.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| ReportError::Plot {
        path: out.display().to_string(),
        message: "the embedded font is unreadable".into(),
    })?;
    let steps: Vec<f64> = m.step.iter().map(|&s| s as f64).collect();
    let x = || steps.iter().copied();
    let per_rank = |table: &ndarray::Array2<u64>| -> Vec<Series> {
        (0..table.ncols()).map(|r| series(format!("rank {r}"), x(), table.column(r).iter().map(|&b| gib(b)))).collect()
    };
    let gpu_title = if m.peak_gpu_mem.iter().any(|&b| b > 0) {
        "Peak GPU memory per rank"
    } else {
        "Peak GPU memory per rank (not recorded: CPU run)"
    };

    // Up to six measurements of the per-position loss, first and last included.
    let rows = m.position_step.len();
    let mut picks: Vec<usize> = (0..rows.min(6)).map(|i| if rows <= 6 { i } else { i * (rows - 1) / 5 }).collect();
    picks.dedup();
    let positions: Vec<Series> = picks
        .iter()
        .map(|&i| {
            series(
                format!("step {}", m.position_step[i]),
                m.bin_start.iter().map(|&p| p as f64),
                m.position_loss.row(i).iter().copied(),
            )
        })
        .collect();
    let pos_title = format!("Mean loss by position ({} bins across the sequence, all ranks)", m.bin_start.len());

    Ok(vec![
        figure(
            &out.join("loss.png"),
            &[
                p("Training loss", "step", "loss (nats)", vec![series("loss", x(), m.loss.iter().copied())], false),
                p("Learning rate", "step", "lr", vec![series("lr", x(), m.lr.iter().copied())], false),
            ],
        )?,
        figure(
            &out.join("position_loss.png"),
            &[p(&pos_title, "position (first token of the bin)", "mean loss (nats)", positions, false)],
        )?,
        figure(
            &out.join("memory.png"),
            &[
                p("Peak host memory per rank", "step", "GiB", per_rank(&m.peak_host_mem), true),
                p(gpu_title, "step", "GiB", per_rank(&m.peak_gpu_mem), true),
            ],
        )?,
        figure(
            &out.join("throughput.png"),
            &[
                p(
                    "Throughput",
                    "step",
                    "tokens/s",
                    vec![series("tokens/s", x(), m.tokens_per_s.iter().copied())],
                    true,
                ),
                p(
                    "Time per step by part",
                    "step",
                    "seconds",
                    m.times.iter().map(|(name, v)| series(*name, x(), v.iter().copied())).collect(),
                    true,
                ),
            ],
        )?,
    ])
}

#[cfg(test)]
mod tests {
    use super::tick_label;

    #[test]
    fn tick_labels_tell_close_values_apart() {
        assert_eq!(tick_label(5.5, 3.4, 6.3), "5.50");
        assert_eq!(tick_label(1.995e-3, 1.97e-3, 2.0e-3), "1.995e-3");
        assert_eq!(tick_label(12000.0, 0.0, 20000.0), "12000");
        assert_ne!(tick_label(1.99e-3, 1.97e-3, 2.0e-3), tick_label(1.98e-3, 1.97e-3, 2.0e-3));
    }
}
