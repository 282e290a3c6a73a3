//! PNGs of an eval results file: accuracy heat maps (length × depth) for passkey / niah, the
//! per-position loss curve for loss. Text is drawn with a DejaVu Sans subset embedded in the
//! binary (assets/fonts, license alongside), so plotting needs no system fonts.
use super::grid::GridResult;
use super::loss::LossResult;
use super::results::{read, EvalResults};
use super::EvalError;
use crate::config::PositionBy;
use ndarray::Array2;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// Writes the plots of `result_h5` into `out_dir` (created if needed) and returns their paths:
/// `<stem>_accuracy.png` and `<stem>_token_accuracy.png` for a grid, `<stem>_by_position.png`
/// for the loss curve, `<stem>` being the results file's name without `.h5`.
pub fn plot_eval(result_h5: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    // Cheap (parses the font's header); registering again replaces the same entry.
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| plot_error(result_h5, "the embedded font does not parse"))?;
    std::fs::create_dir_all(out_dir).map_err(|e| EvalError::results(out_dir, "creating the plot folder", e))?;
    let stem = result_h5.file_stem().map_or("eval".into(), |s| s.to_string_lossy().into_owned());
    match read(result_h5)? {
        EvalResults::Grid { task, result } => {
            let samples = result.logprob.shape()[2];
            let maps = [
                ("accuracy", "exact-match accuracy", result.accuracy()),
                ("token_accuracy", "per-token (digit) accuracy", result.token_accuracy()),
            ];
            let mut out = Vec::new();
            for (suffix, what, values) in maps {
                let path = out_dir.join(format!("{stem}_{suffix}.png"));
                let title = format!("{}: {what}, {samples} samples per cell", task.name());
                heat_map(&path, &title, &result, &values)?;
                out.push(path);
            }
            Ok(out)
        }
        EvalResults::Loss(r) => {
            let path = out_dir.join(format!("{stem}_by_position.png"));
            loss_curve(&path, &r)?;
            Ok(vec![path])
        }
    }
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Plot { path: path.to_path_buf(), detail: e.to_string() }
}

/// Viridis-like colour of a value in [0, 1]: dark purple (0) through teal to yellow (1).
fn colour(v: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 3] = [(68.0, 1.0, 84.0), (33.0, 145.0, 140.0), (253.0, 231.0, 37.0)];
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    let (i, t) = if v < 0.5 { (0, v * 2.0) } else { (1, (v - 0.5) * 2.0) };
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Width of the colour bar column right of a heat map, pixels.
const BAR_WIDTH: u32 = 110;

fn heat_map(path: &Path, title: &str, r: &GridResult, values: &Array2<f64>) -> Result<(), EvalError> {
    let height = (160 + 70 * r.lengths.len()).max(360) as u32;
    // The encoder creates the file: a link planted at its name is removed, not followed.
    crate::files::clear(path).map_err(|e| plot_error(path, e))?;
    let root = BitMapBackend::new(path, (900 + BAR_WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let (map, bar) = root.split_horizontally(900);
    draw_heat_map(&map, title, r, values).map_err(|e| plot_error(path, e))?;
    draw_colour_bar(&bar, height).map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}

/// The scale of the heat map's colours: 0 at the bottom to 1 at the top, level with its cells.
fn draw_colour_bar(area: &DrawingArea<BitMapBackend, Shift>, height: u32) -> Result<(), Box<dyn std::error::Error>> {
    // The map's cells span its height less the caption (top) and the axis labels (bottom).
    let (top, bottom) = (60i32, height as i32 - 66);
    let (left, right) = (10i32, 34i32);
    let steps = 100;
    for i in 0..steps {
        let v = (i as f64 + 0.5) / steps as f64;
        let y0 = bottom - (bottom - top) * (i + 1) / steps;
        let y1 = bottom - (bottom - top) * i / steps;
        area.draw(&Rectangle::new([(left, y0), (right, y1)], colour(v).filled()))?;
    }
    area.draw(&Rectangle::new([(left, top), (right, bottom)], BLACK.stroke_width(1)))?;
    let style = TextStyle::from((FAMILY, 15).into_font()).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = bottom - ((bottom - top) as f64 * tick).round() as i32;
        area.draw(&PathElement::new(vec![(right, y), (right + 5, y)], BLACK.stroke_width(1)))?;
        area.draw(&Text::new(format!("{tick:.2}"), (right + 9, y), style.clone()))?;
    }
    Ok(())
}

fn draw_heat_map(
    root: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    r: &GridResult,
    values: &Array2<f64>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Cell (length i, depth j) is the unit square at (j, i); the tick labels sit at the cells'
    // centres, drawn in pixels since the axes' own labels go to round numbers.
    let (nl, nd) = (r.lengths.len(), r.depths.len());
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..nd as f64, 0.0..nl as f64)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("needle depth (0 = start of the context, 1 = end)")
        .y_desc("context length (tokens)")
        .axis_desc_style((FAMILY, 17))
        .draw()?;
    let cells = (0..nl).flat_map(|li| (0..nd).map(move |di| (li, di)));
    chart.draw_series(cells.clone().map(|(li, di)| {
        let (x, y) = (di as f64, li as f64);
        let v = values[[li, di]];
        Rectangle::new([(x, y), (x + 1.0, y + 1.0)], colour(v).filled())
    }))?;
    let centred = |ink: &'static RGBColor, h: HPos, v: VPos| {
        TextStyle::from((FAMILY, 17).into_font()).color(ink).pos(Pos::new(h, v))
    };
    chart.draw_series(cells.map(|(li, di)| {
        let v = values[[li, di]];
        let ink: &'static RGBColor = if v > 0.6 { &BLACK } else { &WHITE };
        let at = (di as f64 + 0.5, li as f64 + 0.5);
        Text::new(format!("{v:.2}"), at, centred(ink, HPos::Center, VPos::Center))
    }))?;
    for (di, d) in r.depths.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(di as f64 + 0.5, 0.0));
        root.draw(&Text::new(format!("{d:.2}"), (x, y + 8), centred(&BLACK, HPos::Center, VPos::Top)))?;
    }
    for (li, len) in r.lengths.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, li as f64 + 0.5));
        root.draw(&Text::new(len.to_string(), (x - 8, y), centred(&BLACK, HPos::Right, VPos::Center)))?;
    }
    Ok(())
}

fn loss_curve(path: &Path, r: &LossResult) -> Result<(), EvalError> {
    // The encoder creates the file: a link planted at its name is removed, not followed.
    crate::files::clear(path).map_err(|e| plot_error(path, e))?;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    draw_loss_curve(&root, r).map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}

fn draw_loss_curve(root: &DrawingArea<BitMapBackend, Shift>, r: &LossResult) -> Result<(), Box<dyn std::error::Error>> {
    // One point per bin with tokens, at the bin's middle position.
    let points: Vec<(f64, f64)> = (0..r.loss.len())
        .filter(|&b| r.tokens[b] > 0 && r.loss[b].is_finite())
        .map(|b| ((r.bin_start[b] + r.bin_end[b]) as f64 / 2.0, r.loss[b]))
        .collect();
    let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let title = format!("next-token loss by position: {} sequences of {} tokens", r.sequences, r.seq_len);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..r.seq_len as f64, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc(match r.by {
            PositionBy::Sequence => "position in the sequence (tokens)",
            PositionBy::Document => "position within the document (tokens)",
        })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("mean loss (nats)")
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 17))
        .draw()?;
    let blue = RGBColor(31, 119, 180);
    chart.draw_series(LineSeries::new(points.iter().copied(), blue.stroke_width(2)))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, blue.filled())))?;
    Ok(())
}
