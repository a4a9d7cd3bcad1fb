//! Latency CDF plots (SVG and PNG) with a log-scale latency axis, one line per series.
//!
//! Text needs a TrueType font even in the SVG (plotters lays out its labels with it): the
//! first of a few common system fonts is loaded at run time (Debian's fonts-dejavu-core is
//! enough). Without one, no plot is written, a warning says why, and the experiment's
//! table and JSON are still written.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use hdrhistogram::Histogram;
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

/// Registers a system font with plotters once; false if none was found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!(
            "no TrueType font found (looked for {}, ...): plots skipped; \
             install fonts-dejavu-core to get them",
            FONT_PATHS[0]
        );
        false
    })
}

/// One line of a plot.
pub struct Series<'a> {
    pub name: String,
    /// Latencies of the reads that succeeded.
    pub latency: &'a Histogram<u64>,
    /// Reads that failed: the curve levels off at the share that succeeded, as the
    /// table's quantiles read "miss" beyond it.
    pub misses: u64,
}

/// Writes `stem.svg` and `stem.png`; returns the files written (none without a font).
pub fn cdf(stem: &Path, title: &str, series: &[Series<'_>]) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if !font_available() {
        return Ok(written);
    }
    let svg = stem.with_extension("svg");
    draw(
        SVGBackend::new(&svg, (900, 560)).into_drawing_area(),
        title,
        series,
    )?;
    written.push(svg);
    let png = stem.with_extension("png");
    draw(
        BitMapBackend::new(&png, (900, 560)).into_drawing_area(),
        title,
        series,
    )?;
    written.push(png);
    Ok(written)
}

/// Points of a CDF: (latency in ms, fraction of all reads, misses included, that
/// succeeded at or below it).
fn points(h: &Histogram<u64>, misses: u64) -> Vec<(f64, f64)> {
    let total = (h.len() + misses) as f64;
    if total == 0.0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut seen = 0u64;
    for v in h.iter_recorded() {
        seen += v.count_at_value();
        out.push((
            v.value_iterated_to().max(1) as f64 / 1000.0,
            seen as f64 / total,
        ));
    }
    out
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let all: Vec<Vec<(f64, f64)>> = series.iter().map(|s| points(s.latency, s.misses)).collect();
    let max_ms = all
        .iter()
        .flat_map(|p| p.iter().map(|(x, _)| *x))
        .fold(1.0f64, f64::max);
    let min_ms = all
        .iter()
        .flat_map(|p| p.iter().map(|(x, _)| *x))
        .fold(max_ms, f64::min)
        .max(0.001);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d((min_ms * 0.9..max_ms * 1.1).log_scale(), 0.0f64..1.0f64)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of reads")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (s, pts)) in series.iter().zip(&all).enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    Palette99::pick(i).stroke_width(2),
                )
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    area.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A time series plot (hit rate over time, ...): x in seconds, one line per series.
pub fn timeline(
    stem: &Path,
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if !font_available() {
        return Ok(written);
    }
    let svg = stem.with_extension("svg");
    draw_timeline(
        SVGBackend::new(&svg, (900, 420)).into_drawing_area(),
        title,
        y_desc,
        series,
    )?;
    written.push(svg);
    let png = stem.with_extension("png");
    draw_timeline(
        BitMapBackend::new(&png, (900, 420)).into_drawing_area(),
        title,
        y_desc,
        series,
    )?;
    written.push(png);
    Ok(written)
}

fn draw_timeline<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0f64, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                Palette99::pick(i).stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    Palette99::pick(i).stroke_width(2),
                )
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    area.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
