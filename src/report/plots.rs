//! The report's PNGs, drawn with plotters on a bitmap. Text needs a font: DejaVu Sans (reduced
//! to ASCII and a few symbols, licence beside it) is compiled in, so plots look the same on any
//! machine and need no system fonts.
use super::{Metrics, ReportError};
use crate::units::gib;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const SIZE: (u32, u32) = (1100, 900);
/// More lines than this get no legend entries (a legend of 64 ranks hides the plot).
const MAX_LEGEND: usize = 12;

/// Width of the legend column right of a panel's chart, pixels.
const LEGEND_WIDTH: u32 = 150;
/// Series with at most this many points also get a dot at each point.
const MAX_MARKED: usize = 100;
/// Series with more points than this are drawn one pixel wide.
const MAX_THICK: usize = 200;

/// One line of a panel: its points in runs of finite values (a NaN, such as a position bin with
/// no label, breaks the line instead of being bridged).
struct Series {
    label: String,
    runs: Vec<Vec<(f64, f64)>>,
}

fn series(label: impl Into<String>, x: impl IntoIterator<Item = f64>, y: impl IntoIterator<Item = f64>) -> Series {
    let mut runs = vec![Vec::new()];
    for (x, y) in x.into_iter().zip(y) {
        match (y.is_finite(), runs.last().is_some_and(Vec::is_empty)) {
            (true, _) => runs.last_mut().expect("never empty").push((x, y)),
            (false, false) => runs.push(Vec::new()),
            (false, true) => {}
        }
    }
    runs.retain(|r| !r.is_empty());
    Series { label: label.into(), runs }
}

impl Series {
    fn points(&self) -> impl Iterator<Item = &(f64, f64)> {
        self.runs.iter().flatten()
    }
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

/// Ticks on an axis of whole numbers (steps, positions): never more than there are integers in
/// the range, so no label repeats.
fn integer_ticks(lo: f64, hi: f64) -> usize {
    ((hi - lo).floor() as usize + 1).clamp(2, 10)
}

/// One line chart in `area`, its legend (when it has several lines) in a column on the right so
/// it never covers data. Quantities (memory, throughput) start their axis at 0 so small
/// differences do not look large.
fn panel(area: &DrawingArea<BitMapBackend, Shift>, p: &Panel) -> Result<(), String> {
    let Panel { title, x_desc, y_desc, lines, from_zero, x_range } = p;
    let legend = lines.len() > 1 && lines.len() <= MAX_LEGEND;
    let (plot_area, legend_area) = if legend {
        let (w, _) = area.dim_in_pixel();
        let (a, b) = area.split_horizontally(w.saturating_sub(LEGEND_WIDTH));
        (a, Some(b))
    } else {
        (area.clone(), None)
    };
    let (x0, x1) = x_range.unwrap_or_else(|| range(lines.iter().flat_map(|s| s.points().map(|p| p.0)), 0.0));
    let zero = from_zero.then_some(0.0);
    let (y0, y1) = range(lines.iter().flat_map(|s| s.points().map(|p| p.1)).chain(zero), 0.05);
    let y0 = if *from_zero { 0.0 } else { y0 };
    let mut chart = ChartBuilder::on(&plot_area)
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
        .x_labels(integer_ticks(x0, x1))
        .y_label_formatter(&|v| tick_label(*v, y0, y1))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // plotters joins thick lines with miters, which shoot far out of the chart at the sharp
        // turns of a long, noisy series (a one-step spike in the time split): draw those thin.
        let width = if s.points().count() > MAX_THICK { 1 } else { 2 };
        for run in &s.runs {
            chart
                .draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(width)))
                .map_err(|e| e.to_string())?;
        }
        if s.points().count() <= MAX_MARKED {
            chart.draw_series(s.points().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
        }
    }
    if let Some(legend_area) = legend_area {
        draw_legend(&legend_area, lines)?;
    }
    Ok(())
}

/// A line sample and its label per series, top to bottom, level with the chart's top.
fn draw_legend(area: &DrawingArea<BitMapBackend, Shift>, lines: &[Series]) -> Result<(), String> {
    let style = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, s) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let y = 70 + 24 * i as i32;
        area.draw(&PathElement::new(vec![(4, y), (28, y)], color.stroke_width(3))).map_err(|e| e.to_string())?;
        area.draw(&Text::new(s.label.clone(), (36, y), style.clone())).map_err(|e| e.to_string())?;
    }
    Ok(())
}

struct Panel<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    lines: Vec<Series>,
    from_zero: bool,
    /// The x axis' extent when the data's own would mislead (positions: the whole sequence).
    x_range: Option<(f64, f64)>,
}

fn p<'a>(title: &'a str, x_desc: &'a str, y_desc: &'a str, lines: Vec<Series>, from_zero: bool) -> Panel<'a> {
    Panel { title, x_desc, y_desc, lines, from_zero, x_range: None }
}

/// A PNG of vertically stacked panels.
fn figure(path: &Path, panels: &[Panel]) -> Result<PathBuf, ReportError> {
    let plot_err = |message: String| ReportError::Plot { path: path.display().to_string(), message };
    // The encoder creates the file: a link planted at its name is removed, not followed.
    crate::files::clear(path).map_err(|e| plot_err(e.to_string()))?;
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
    // CPU runs record no GPU memory: their figure has the host panel only.
    let mut memory = vec![p("Peak host memory per rank", "step", "GiB", per_rank(&m.peak_host_mem), true)];
    if m.peak_gpu_mem.iter().any(|&b| b > 0) {
        memory.push(p("Peak GPU memory per rank", "step", "GiB", per_rank(&m.peak_gpu_mem), true));
    }

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
    let scored = (0..m.bin_start.len()).filter(|&b| m.position_loss.column(b).iter().any(|v| v.is_finite())).count();
    let pos_title = if scored < m.bin_start.len() {
        format!(
            "Mean loss by position ({} bins, {scored} with labels: e.g. loss on the answer only)",
            m.bin_start.len()
        )
    } else {
        format!("Mean loss by position ({} bins across the sequence, all ranks)", m.bin_start.len())
    };
    let whole_sequence = Some((0.0, m.seq_len as f64));

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
            &[Panel {
                x_range: whole_sequence,
                ..p(&pos_title, "position (first token of the bin)", "mean loss (nats)", positions, false)
            }],
        )?,
        figure(&out.join("memory.png"), &memory)?,
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
                    m.times
                        .iter()
                        .filter(|(name, _)| *name != "checkpoint")
                        .map(|(name, v)| series(*name, x(), v.iter().copied()))
                        .collect(),
                    true,
                ),
            ],
        )?,
    ])
}

#[cfg(test)]
mod tests {
    use super::{integer_ticks, series, tick_label};

    #[test]
    fn nan_breaks_a_line_and_integer_axes_do_not_repeat_ticks() {
        let s = series("x", [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, f64::NAN, f64::NAN, 2.0, 3.0]);
        assert_eq!(s.runs, vec![vec![(0.0, 1.0)], vec![(3.0, 2.0), (4.0, 3.0)]]);
        assert!(series("x", [0.0], [f64::NAN]).runs.is_empty());
        assert_eq!(integer_ticks(1.0, 4.0), 4);
        assert_eq!(integer_ticks(0.0, 1000.0), 10);
    }

    #[test]
    fn tick_labels_tell_close_values_apart() {
        assert_eq!(tick_label(5.5, 3.4, 6.3), "5.50");
        assert_eq!(tick_label(1.995e-3, 1.97e-3, 2.0e-3), "1.995e-3");
        assert_eq!(tick_label(12000.0, 0.0, 20000.0), "12000");
        assert_ne!(tick_label(1.99e-3, 1.97e-3, 2.0e-3), tick_label(1.98e-3, 1.97e-3, 2.0e-3));
    }
}
