//! PNG charts for the benchmark report: line charts (e.g. latency against clients) and
//! horizontal bar charts (one value per system), drawn with plotters' bitmap backend.
//!
//! Text goes through ab_glyph, which ships no fonts: the first chart loads a TrueType font
//! from the system (see [`FONT_ENV`] and [`FONT_PATHS`]) and registers it as "sans-serif",
//! the family plotters uses for every label.
//!
//! Charts are rendered into memory first and written out only once drawing succeeded, so a
//! failed chart never leaves a half-drawn PNG behind.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Context, Error, Result};

/// Size of every chart.
const WIDTH_PX: u32 = 1000;
const HEIGHT_PX: u32 = 600;

/// Environment variable naming a .ttf/.otf file to use instead of searching [`FONT_PATHS`].
pub const FONT_ENV: &str = "MERIDIAN_BENCH_FONT";

/// Where common Linux distributions (and macOS) keep a plain sans-serif TrueType font;
/// the first readable one wins.
pub const FONT_PATHS: &[&str] = &[
    // Debian/Ubuntu: fonts-dejavu-core
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    // Fedora, Arch
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    // Liberation (Debian fonts-liberation / fonts-liberation2, Fedora)
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    // Noto (Debian fonts-noto-core, Arch)
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    // macOS
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// One line on a [`Chart`].
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// `(x, y)` points, joined in the order given (not sorted by x).
    pub points: Vec<(f64, f64)>,
    pub style: SeriesStyle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesStyle {
    /// A solid line.
    Line,
    /// A solid line with a dot on every point.
    LinePoints,
    /// A dashed line, for floors and targets (give two points spanning the x range for a
    /// horizontal one).
    Dashed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base 10. Values ≤ 0 cannot be placed on it: they are left out (see [`line_chart`]
    /// and [`bar_chart`]).
    Log,
}

/// What [`line_chart`] draws.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub series: &'a [Series],
}

/// Draws `chart` into a PNG of 1000×600 px at `path` (which must end in `.png`; its
/// directory must exist).
///
/// Axis ranges follow the data with a margin. Points that cannot be placed are left out:
/// non-finite coordinates, and on a [`Scale::Log`] axis values ≤ 0; the legend says how
/// many points of a series were left out ("no data" when all were). Every series gets its
/// own colour (they repeat after 10 series) and a legend entry, in the order given.
///
/// Returns an error, and writes nothing, when no point of any series can be drawn: an
/// empty chart in a report would hide a failed measurement.
pub fn line_chart(path: &Path, chart: &Chart<'_>) -> Result<()> {
    render_to_file(path, |root| render_line_chart(root, chart))
        .with_context(|| format!("line chart {:?} ({})", chart.title, path.display()))
}

/// Horizontal bar chart for categories (e.g. "write p50 at 40 ms delay": Meridian vs etcd
/// vs redis), values on a log or linear axis, into a PNG of 1000×600 px at `path` (which
/// must end in `.png`; its directory must exist).
///
/// Bars are drawn top to bottom in the order given, each in its own colour, with the
/// value written at its end. A value that cannot be drawn (non-finite, or ≤ 0 on a
/// [`Scale::Log`] axis) keeps its category row, with a note instead of a bar.
///
/// Returns an error, and writes nothing, when `bars` is empty or no bar can be drawn.
pub fn bar_chart(
    path: &Path,
    title: &str,
    value_label: &str,
    scale: Scale,
    bars: &[(String, f64)],
) -> Result<()> {
    render_to_file(path, |root| {
        render_bar_chart(root, title, value_label, scale, bars)
    })
    .with_context(|| format!("bar chart {title:?} ({})", path.display()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Renders with `draw` into an RGB buffer, then writes that buffer as a PNG.
fn render_to_file(path: &Path, draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<()> {
    // The bitmap backend picks the image format from the extension; insist on PNG.
    if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Err(Error::runtime(
            "the file name must end in .png (the image format follows the extension)",
        ));
    }
    let pixels = render_to_buffer(draw)?;
    let mut file = BitMapBackend::new(path, (WIDTH_PX, HEIGHT_PX));
    file.blit_bitmap((0, 0), (WIDTH_PX, HEIGHT_PX), &pixels)
        .context("copying the rendered chart")?;
    file.present().context("writing the PNG")
}

/// Renders with `draw` into a fresh WIDTH_PX×HEIGHT_PX RGB buffer (3 bytes a pixel).
fn render_to_buffer(draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<Vec<u8>> {
    ensure_font()?;
    let mut pixels = vec![0u8; WIDTH_PX as usize * HEIGHT_PX as usize * 3];
    {
        let backend: BitMapBackend<'_> =
            BitMapBackend::with_buffer_and_format(&mut pixels, (WIDTH_PX, HEIGHT_PX))
                .context("creating the image buffer")?;
        let root = backend.into_drawing_area();
        root.fill(&WHITE).context("clearing the background")?;
        draw(&root)?;
        root.present().context("finishing the image")?;
    }
    Ok(pixels)
}

// ---------------------------------------------------------------------------------------
// Fonts

/// The outcome of the one font search of this process: the font used, or why none was.
static FONT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// Registers a system font as "sans-serif" the first time it is called.
fn ensure_font() -> Result<()> {
    FONT.get_or_init(|| register_system_font().map_err(|e| e.to_string()))
        .as_ref()
        .map(|_| ())
        .map_err(|msg| Error::runtime(msg.clone()))
}

fn register_system_font() -> Result<PathBuf> {
    let (path, bytes) = match std::env::var_os(FONT_ENV).filter(|v| !v.is_empty()) {
        // An explicit choice is used or reported, never silently replaced by another font.
        Some(p) => {
            let path = PathBuf::from(p);
            let bytes =
                read_font(&path).with_context(|| format!("{FONT_ENV}={}", path.display()))?;
            (path, bytes)
        }
        None => {
            let candidates: Vec<PathBuf> = FONT_PATHS.iter().map(PathBuf::from).collect();
            find_font(&candidates)?
        }
    };
    // ab_glyph keeps borrowing the font data for the rest of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| Error::runtime(format!("{}: not a font ab_glyph can read", path.display())))?;
    Ok(path)
}

/// The first of `candidates` that holds a TrueType/OpenType font, with its contents.
fn find_font(candidates: &[PathBuf]) -> Result<(PathBuf, Vec<u8>)> {
    let mut problems = Vec::new();
    for path in candidates {
        match read_font(path) {
            Ok(bytes) => return Ok((path.clone(), bytes)),
            Err(FontProblem::Missing) => {}
            Err(p) => problems.push(format!("{}: {p}", path.display())),
        }
    }
    let tried = candidates
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut msg = format!(
        "no font found for chart text (tried {tried}); `apt-get install fonts-dejavu-core` \
         provides one, or set {FONT_ENV} to a .ttf file"
    );
    if !problems.is_empty() {
        msg.push_str(&format!("; unusable: {}", problems.join("; ")));
    }
    Err(Error::runtime(msg))
}

#[derive(Debug)]
enum FontProblem {
    Missing,
    Unreadable(std::io::Error),
    NotAFont,
}

impl std::fmt::Display for FontProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FontProblem::Missing => f.write_str("no such file"),
            FontProblem::Unreadable(e) => write!(f, "cannot read: {e}"),
            FontProblem::NotAFont => f.write_str("not a TrueType/OpenType font"),
        }
    }
}

fn read_font(path: &Path) -> std::result::Result<Vec<u8>, FontProblem> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FontProblem::Missing,
        _ => FontProblem::Unreadable(e),
    })?;
    // Checked here rather than by ab_glyph so that a wrong file is reported with its path
    // before any memory is leaked for it.
    const MAGICS: [[u8; 4]; 4] = [[0, 1, 0, 0], *b"OTTO", *b"true", *b"ttcf"];
    match bytes.get(..4) {
        Some(m) if MAGICS.iter().any(|magic| magic == m) => Ok(bytes),
        _ => Err(FontProblem::NotAFont),
    }
}

// ---------------------------------------------------------------------------------------
// Look

const TITLE_FONT_PX: u32 = 24;
const DESC_FONT_PX: u32 = 17;
const LABEL_FONT_PX: u32 = 15;
/// Most tick labels on an axis; log axes may show fewer.
const MAX_TICKS: usize = 10;

/// Tableau 10: distinct hues that stay apart when printed or seen with common colour
/// blindness.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

const NOTE_COLOUR: RGBColor = RGBColor(110, 110, 110);
const DASH_PX: i32 = 10;
const DASH_GAP_PX: i32 = 7;
const LINE_WIDTH_PX: u32 = 2;
const POINT_RADIUS_PX: u32 = 4;

fn font(size_px: u32) -> TextStyle<'static> {
    ("sans-serif", size_px).into_font().into()
}

// ---------------------------------------------------------------------------------------
// Axes

/// One axis: its range and scale, labelled ticks and unlabelled grid lines. It is its own
/// plotters coordinate, so that one chart type serves linear and log axes alike (plotters'
/// own log axis drops all its ticks on a range within one decade).
#[derive(Debug, Clone)]
struct Axis {
    range: Range<f64>,
    log: bool,
    ticks: Vec<f64>,
    light: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (from_px, to_px): (i32, i32)) -> i32 {
        let (start, end, v) = if self.log {
            (
                self.range.start.log10(),
                self.range.end.log10(),
                value.log10(),
            )
        } else {
            (self.range.start, self.range.end, *value)
        };
        let fraction = if end > start {
            (v - start) / (end - start)
        } else {
            0.5
        };
        // `as` saturates, and NaN (log of a value ≤ 0, never passed in) becomes 0.
        (f64::from(from_px) + fraction * f64::from(to_px - from_px)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format(value: &f64) -> String {
        tick_label(value)
    }
}

impl Axis {
    /// An axis covering `lo..=hi` (finite, and > 0 for a log axis) with some margin.
    fn fit(scale: Scale, lo: f64, hi: f64) -> Axis {
        match scale {
            Scale::Linear => {
                let span = hi - lo;
                let pad = if span > 0.0 {
                    span * 0.05
                } else {
                    (lo.abs() * 0.1).max(1.0)
                };
                // Do not invent negative values (or positive ones) the data never had.
                let start = if lo >= 0.0 {
                    (lo - pad).max(0.0)
                } else {
                    lo - pad
                };
                let end = if hi <= 0.0 {
                    (hi + pad).min(0.0)
                } else {
                    hi + pad
                };
                Axis::linear(start..end)
            }
            Scale::Log => {
                let factor = if hi > lo {
                    (hi / lo).powf(0.05).max(1.1)
                } else {
                    2.0
                };
                Axis::log((lo / factor)..(hi * factor))
            }
        }
    }

    fn linear(range: Range<f64>) -> Axis {
        let ticks = nice_ticks(range.start, range.end, MAX_TICKS);
        let light = match ticks.as_slice() {
            [a, b, ..] => {
                let half = (b - a) / 2.0;
                let below = std::iter::once(a - half);
                below
                    .chain(ticks.iter().map(|t| t + half))
                    .filter(|v| range.contains(v))
                    .collect()
            }
            _ => Vec::new(),
        };
        Axis {
            range,
            log: false,
            ticks,
            light,
        }
    }

    fn log(range: Range<f64>) -> Axis {
        let (ticks, light) = log_ticks(range.start, range.end, MAX_TICKS);
        Axis {
            range,
            log: true,
            ticks,
            light,
        }
    }
}

/// Ticks at 1, 2 or 5 × 10^k between `lo` and `hi`, at most about `max_n` of them.
fn nice_ticks(lo: f64, hi: f64, max_n: usize) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) || max_n == 0 {
        return vec![lo];
    }
    let raw = span / max_n as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// Labelled ticks and grid lines for a log axis over `lo..hi` (both > 0): the densest of
/// 1–9, 1/2/5, 1/3 or 1 × 10^k that gives at most `max_n` labels; every n-th decade when
/// even one a decade is too many; plain linear ticks when the range is too narrow to
/// contain two of them. Grid lines go at every 1–9 × 10^k.
fn log_ticks(lo: f64, hi: f64, max_n: usize) -> (Vec<f64>, Vec<f64>) {
    const SETS: [&[f64]; 4] = [
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 3.0],
        &[1.0],
    ];
    let every = decade_ticks(lo, hi, SETS[0], 1);
    let mut bold = None;
    for set in SETS {
        let t = decade_ticks(lo, hi, set, 1);
        if t.len() <= max_n {
            bold = Some(if t.len() >= 2 {
                t
            } else {
                nice_ticks(lo, hi, max_n)
            });
            break;
        }
    }
    let bold = bold.unwrap_or_else(|| {
        let decades = (hi / lo).log10().ceil().max(1.0) as usize;
        decade_ticks(lo, hi, &[1.0], decades.div_ceil(max_n.max(1)) as i32)
    });
    // Past a few decades the grid would be a grey wash: keep one line a decade there.
    let light = if every.len() <= 40 {
        every
    } else {
        decade_ticks(lo, hi, &[1.0], 1)
    };
    let light = light.into_iter().filter(|v| !bold.contains(v)).collect();
    (bold, light)
}

/// `m × 10^e` for every `m` in `mantissas` and every `e` divisible by `every_decades`,
/// within `lo..=hi`, ascending.
fn decade_ticks(lo: f64, hi: f64, mantissas: &[f64], every_decades: i32) -> Vec<f64> {
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    let mut out = Vec::new();
    for e in first..=last {
        if e.rem_euclid(every_decades.max(1)) != 0 {
            continue;
        }
        // Computed from an exact integer power so that 3 × 10^-1 prints as 0.3.
        let decade = if e >= 0 {
            10f64.powi(e)
        } else {
            1.0 / 10f64.powi(-e)
        };
        out.extend(
            mantissas
                .iter()
                .map(|m| m * decade)
                .filter(|v| (lo..=hi).contains(v)),
        );
    }
    out
}

/// `v` with at most `significant` significant digits and no trailing zeros; very large or
/// small magnitudes in exponent form ("2.5e6", "1e-4").
fn format_number(v: f64, significant: usize) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let significant = significant.max(1);
    let exponent = v.abs().log10().floor() as i32;
    if !(-3..6).contains(&exponent) {
        let s = format!("{:.*e}", significant - 1, v);
        return match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
            None => s,
        };
    }
    let decimals = (significant as i32 - 1 - exponent).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn tick_label(v: &f64) -> String {
    format_number(*v, 6)
}

/// Whether `v` can be placed on an axis of `scale`.
fn plottable(scale: Scale, v: f64) -> bool {
    v.is_finite() && (scale == Scale::Linear || v > 0.0)
}

/// `text`, shortened with "…" until it fits in `max_px` in `style`.
fn fit_text(area: &Area<'_>, text: &str, style: &TextStyle<'_>, max_px: u32) -> Result<String> {
    let width = |s: &str| -> Result<u32> {
        Ok(area
            .estimate_text_size(s, style)
            .context("measuring text")?
            .0)
    };
    if width(text)? <= max_px {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().chain(std::iter::once(&'…')).collect();
        if width(&candidate)? <= max_px {
            return Ok(candidate);
        }
    }
    Ok("…".to_string())
}

/// Width of the widest tick label on `axis`.
fn widest_label_px(area: &Area<'_>, axis: &Axis, style: &TextStyle<'_>) -> Result<u32> {
    let mut widest = 0;
    for t in &axis.ticks {
        let (w, _) = area
            .estimate_text_size(&tick_label(t), style)
            .context("measuring tick labels")?;
        widest = widest.max(w);
    }
    Ok(widest)
}

// ---------------------------------------------------------------------------------------
// Line chart

fn render_line_chart(root: &Area<'_>, chart: &Chart<'_>) -> Result<()> {
    // The points each series can show; the legend reports the ones left out.
    let plotted: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|&(x, y)| plottable(chart.x_scale, x) && plottable(chart.y_scale, y))
                .collect()
        })
        .collect();
    let all = plotted.iter().flatten();
    let bounds = all.fold(None, |acc: Option<[f64; 4]>, &(x, y)| {
        Some(match acc {
            None => [x, x, y, y],
            Some([x0, x1, y0, y1]) => [x0.min(x), x1.max(x), y0.min(y), y1.max(y)],
        })
    });
    let Some([x_lo, x_hi, y_lo, y_hi]) = bounds else {
        let log_note = if chart.x_scale == Scale::Log || chart.y_scale == Scale::Log {
            ", or only values ≤ 0 on a log axis"
        } else {
            ""
        };
        return Err(Error::runtime(format!(
            "nothing to plot: {} series, none with a finite point{log_note}",
            chart.series.len()
        )));
    };
    let x_axis = Axis::fit(chart.x_scale, x_lo, x_hi);
    let y_axis = Axis::fit(chart.y_scale, y_lo, y_hi);

    let legend: Vec<LegendEntry> = chart
        .series
        .iter()
        .zip(&plotted)
        .enumerate()
        .map(|(i, (s, shown))| {
            let left_out = s.points.len() - shown.len();
            let label = if shown.is_empty() {
                format!("{} (no data)", s.name)
            } else if left_out > 0 {
                format!(
                    "{} ({left_out} of {} points not shown)",
                    s.name,
                    s.points.len()
                )
            } else {
                s.name.clone()
            };
            LegendEntry {
                label,
                colour: colour(i),
                style: s.style,
            }
        })
        .collect();

    let body = root
        .titled(chart.title, font(TITLE_FONT_PX))
        .context("drawing the title")?;
    let legend_width_px = legend_width_px(root, &legend)?;
    let (plot_area, legend_area) = body.split_horizontally(WIDTH_PX - legend_width_px);

    let label_style = font(LABEL_FONT_PX);
    let y_label_area_px = widest_label_px(root, &y_axis, &label_style)? + DESC_FONT_PX + 24;
    let layout = Layout {
        x_desc: chart.x_label,
        y_desc: chart.y_label,
        y_label_area_px,
        draw_y_grid: true,
    };

    draw_on(&plot_area, &layout, (x_axis, y_axis), &tick_label, |ctx| {
        draw_series(ctx, chart.series, &plotted)
    })?;

    draw_legend(&legend_area, &legend)
}

/// A chart's drawing context: both axes are [`Axis`].
type Ctx<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;

fn draw_series(
    ctx: &mut Ctx<'_, '_>,
    series: &[Series],
    plotted: &[Vec<(f64, f64)>],
) -> Result<()> {
    for (i, (s, points)) in series.iter().zip(plotted).enumerate() {
        let line = colour(i).stroke_width(LINE_WIDTH_PX);
        let points = points.iter().copied();
        match s.style {
            SeriesStyle::Line => ctx.draw_series(LineSeries::new(points, line)).map(|_| ()),
            SeriesStyle::LinePoints => ctx
                .draw_series(LineSeries::new(points, line.filled()).point_size(POINT_RADIUS_PX))
                .map(|_| ()),
            SeriesStyle::Dashed => ctx
                .draw_series(DashedLineSeries::new(points, DASH_PX, DASH_GAP_PX, line))
                .map(|_| ()),
        }
        .with_context(|| format!("drawing series {:?}", s.name))?;
        // A single point makes no line: mark it so that it does not vanish.
        if let [only] = plotted[i].as_slice() {
            ctx.draw_series(std::iter::once(Circle::new(
                *only,
                POINT_RADIUS_PX,
                colour(i).filled(),
            )))
            .with_context(|| format!("drawing series {:?}", s.name))?;
        }
    }
    Ok(())
}

/// Axis text and sizes for [`draw_on`].
struct Layout<'a> {
    x_desc: &'a str,
    y_desc: &'a str,
    y_label_area_px: u32,
    /// Horizontal grid lines (off for bar charts, where they would cross the bars).
    draw_y_grid: bool,
}

/// Builds a chart context over `area` with the given axes, draws the mesh, then hands the
/// context to `draw`.
fn draw_on(
    area: &Area<'_>,
    layout: &Layout<'_>,
    (x_axis, y_axis): (Axis, Axis),
    y_formatter: &dyn Fn(&f64) -> String,
    draw: impl FnOnce(&mut Ctx<'_, '_>) -> Result<()>,
) -> Result<()> {
    let mut ctx = ChartBuilder::on(area)
        .margin_top(10)
        .margin_bottom(10)
        .margin_left(10)
        .margin_right(25)
        .x_label_area_size(LABEL_FONT_PX + DESC_FONT_PX + 30)
        .y_label_area_size(layout.y_label_area_px)
        .build_cartesian_2d(x_axis, y_axis)
        .context("laying out the axes")?;
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(layout.x_desc)
        .y_desc(layout.y_desc)
        .x_label_formatter(&tick_label)
        .y_label_formatter(y_formatter)
        .label_style(font(LABEL_FONT_PX))
        .axis_desc_style(font(DESC_FONT_PX));
    if !layout.draw_y_grid {
        mesh.disable_y_mesh();
    }
    mesh.draw().context("drawing the axes")?;
    draw(&mut ctx)
}

struct LegendEntry {
    label: String,
    colour: RGBColor,
    style: SeriesStyle,
}

const LEGEND_SWATCH_PX: i32 = 40;
const LEGEND_ROW_PX: i32 = 26;
const LEGEND_MAX_WIDTH_PX: u32 = 340;

fn legend_width_px(area: &Area<'_>, entries: &[LegendEntry]) -> Result<u32> {
    let style = font(LABEL_FONT_PX);
    let mut widest = 0;
    for e in entries {
        let (w, _) = area
            .estimate_text_size(&e.label, &style)
            .context("measuring the legend")?;
        widest = widest.max(w);
    }
    Ok((widest + LEGEND_SWATCH_PX as u32 + 40).clamp(140, LEGEND_MAX_WIDTH_PX))
}

/// Draws the legend as its own column right of the plot, where it cannot hide any data.
fn draw_legend(area: &Area<'_>, entries: &[LegendEntry]) -> Result<()> {
    let style = font(LABEL_FONT_PX).pos(Pos::new(HPos::Left, VPos::Center));
    let (width_px, _) = area.dim_in_pixel();
    let text_x = 10 + LEGEND_SWATCH_PX + 8;
    let max_text_px = width_px.saturating_sub(text_x as u32 + 8);
    for (i, e) in entries.iter().enumerate() {
        let y = 20 + i as i32 * LEGEND_ROW_PX;
        let (x0, x1) = (10, 10 + LEGEND_SWATCH_PX);
        let line = e.colour.stroke_width(LINE_WIDTH_PX);
        let drawn = match e.style {
            SeriesStyle::Line => area.draw(&PathElement::new(vec![(x0, y), (x1, y)], line)),
            SeriesStyle::LinePoints => area
                .draw(&PathElement::new(vec![(x0, y), (x1, y)], line))
                .and_then(|()| {
                    area.draw(&Circle::new(
                        ((x0 + x1) / 2, y),
                        POINT_RADIUS_PX,
                        e.colour.filled(),
                    ))
                }),
            SeriesStyle::Dashed => area.draw(&DashedPathElement::new(
                vec![(x0, y), (x1, y)],
                DASH_PX,
                DASH_GAP_PX,
                line,
            )),
        };
        drawn.context("drawing the legend")?;
        let label = fit_text(area, &e.label, &style, max_text_px)?;
        area.draw_text(&label, &style, (text_x, y))
            .context("drawing the legend")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bar chart

fn render_bar_chart(
    root: &Area<'_>,
    title: &str,
    value_label: &str,
    scale: Scale,
    bars: &[(String, f64)],
) -> Result<()> {
    let shown = bars
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| plottable(scale, *v));
    let bounds = shown.fold(None, |acc: Option<(f64, f64)>, v| {
        Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
    });
    let Some((lo, hi)) = bounds else {
        return Err(Error::runtime(if bars.is_empty() {
            "nothing to plot: no bars".to_string()
        } else {
            format!(
                "nothing to plot: none of the {} bars has a finite value{}",
                bars.len(),
                if scale == Scale::Log { " > 0" } else { "" }
            )
        }));
    };
    // Bars grow from 0 (linear) or from the left edge (log); the right end leaves room for
    // the value written after the longest bar.
    let axis = match scale {
        Scale::Linear => {
            let (start, end) = (lo.min(0.0), hi.max(0.0));
            let span = if end > start { end - start } else { 1.0 };
            let start = if start < 0.0 {
                start - span * 0.05
            } else {
                start
            };
            Axis::linear(start..end + span * 0.15)
        }
        Scale::Log => {
            let below = if hi > lo {
                (hi / lo).powf(0.15).max(2.0)
            } else {
                2.0
            };
            let start = lo / below;
            // The longest bar ends at about 85 % of the axis.
            let end = 10f64.powf(start.log10() + (hi.log10() - start.log10()) / 0.85);
            Axis::log(start..end)
        }
    };
    let base = match scale {
        Scale::Linear => 0.0,
        Scale::Log => axis.range.start,
    };

    let body = root
        .titled(title, font(TITLE_FONT_PX))
        .context("drawing the title")?;
    let label_style = font(LABEL_FONT_PX);
    // Category names sit where a y axis has its tick labels; long ones are shortened so
    // that the bars keep at least half the width.
    let max_name_px = WIDTH_PX * 2 / 5;
    let names: Vec<String> = bars
        .iter()
        .map(|(name, _)| fit_text(root, name, &label_style, max_name_px))
        .collect::<Result<_>>()?;
    let mut widest_name_px = 0;
    for name in &names {
        let (w, _) = root
            .estimate_text_size(name, &label_style)
            .context("measuring category names")?;
        widest_name_px = widest_name_px.max(w);
    }
    let layout = Layout {
        x_desc: value_label,
        y_desc: "",
        y_label_area_px: widest_name_px + 20,
        draw_y_grid: false,
    };

    // Category i is the row i..i+1 counted from the top; its name labels the row's middle.
    let n = bars.len();
    let rows = Axis {
        range: 0.0..n as f64,
        log: false,
        ticks: (0..n).map(|i| i as f64 + 0.5).collect(),
        light: Vec::new(),
    };
    let name_of = |y: &f64| {
        n.checked_sub(1 + y.floor() as usize)
            .and_then(|i| names.get(i))
            .cloned()
            .unwrap_or_default()
    };

    let value_style = font(LABEL_FONT_PX).pos(Pos::new(HPos::Left, VPos::Center));
    let note_style = value_style.color(&NOTE_COLOUR);
    let text = |at: (f64, f64), text: String, style: &TextStyle<'static>| {
        // Offset from the bar's end in pixels, not in data units, so it reads the same on
        // both scales.
        EmptyElement::at(at) + Text::new(text, (6, 0), style.clone())
    };
    draw_on(&body, &layout, (axis, rows), &name_of, |ctx| {
        for (i, (name, v)) in bars.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            if plottable(scale, *v) {
                let bar = Rectangle::new([(base, y + 0.2), (*v, y + 0.8)], colour(i).filled());
                // Negative bars end left of 0: their value goes right of 0 instead.
                let value = text((v.max(base), y + 0.5), format_number(*v, 4), &value_style);
                ctx.draw_series(std::iter::once(bar))
                    .with_context(|| format!("drawing bar {name:?}"))?;
                ctx.draw_series(std::iter::once(value))
                    .with_context(|| format!("drawing bar {name:?}"))?;
            } else {
                let why = if v.is_finite() {
                    format!(
                        "{}: not shown (a log axis needs values > 0)",
                        format_number(*v, 4)
                    )
                } else {
                    format!("{v}: not shown")
                };
                ctx.draw_series(std::iter::once(text((base, y + 0.5), why, &note_style)))
                    .with_context(|| format!("drawing bar {name:?}"))?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// Width and height from the IHDR chunk, which the PNG format puts first.
    fn png_dims_px(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 24, "PNG too short: {} bytes", bytes.len());
        assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    /// Size of an all-white chart-sized PNG: what a chart that draws nothing would weigh.
    fn blank_png_len(dir: &Path) -> usize {
        let path = dir.join("blank.png");
        render_to_file(&path, |_| Ok(())).expect("blank PNG");
        std::fs::read(&path).expect("read blank PNG").len()
    }

    /// Checks that `path` is a 1000×600 PNG with clearly more in it than a blank image.
    fn assert_drawn_png(path: &Path, blank_len: usize) {
        let bytes = std::fs::read(path).expect("chart file exists");
        assert_eq!(png_dims_px(&bytes), (WIDTH_PX, HEIGHT_PX));
        assert!(
            bytes.len() > 2 * blank_len,
            "{} is {} bytes, barely more than a blank image ({blank_len} bytes)",
            path.display(),
            bytes.len()
        );
    }

    fn pixel(pixels: &[u8], x: usize, y: usize) -> (u8, u8, u8) {
        let i = (y * WIDTH_PX as usize + x) * 3;
        (pixels[i], pixels[i + 1], pixels[i + 2])
    }

    fn is_colour(p: (u8, u8, u8), c: RGBColor) -> bool {
        p == (c.0, c.1, c.2)
    }

    /// Dark pixels (text, axes) in the rectangle `xs` × `ys`.
    fn dark_pixels(pixels: &[u8], xs: Range<usize>, ys: Range<usize>) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let (r, g, b) = pixel(pixels, x, y);
                r < 100 && g < 100 && b < 100
            })
            .count()
    }

    /// The row holding the most pixels of `c`, and how many separate runs of `c` it has:
    /// one for a solid horizontal line, many for a dashed one.
    fn best_row_runs(pixels: &[u8], c: RGBColor) -> (usize, usize) {
        let mut best = (0, 0);
        for y in 0..HEIGHT_PX as usize {
            let row: Vec<bool> = (0..WIDTH_PX as usize)
                .map(|x| is_colour(pixel(pixels, x, y), c))
                .collect();
            let count = row.iter().filter(|&&on| on).count();
            if count > best.0 {
                let runs = row.windows(2).filter(|w| w[1] && !w[0]).count() + usize::from(row[0]);
                best = (count, runs);
            }
        }
        best
    }

    fn colour_pixels(pixels: &[u8], c: RGBColor) -> usize {
        pixels
            .chunks_exact(3)
            .filter(|p| (p[0], p[1], p[2]) == (c.0, c.1, c.2))
            .count()
    }

    fn latency_series() -> Vec<Series> {
        let clients = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
        let curve = |base: f64, growth: f64| -> Vec<(f64, f64)> {
            clients
                .iter()
                .map(|&c| (c, base * (1.0 + growth * c)))
                .collect()
        };
        vec![
            Series {
                name: "Meridian".into(),
                points: curve(2.1, 0.05),
                style: SeriesStyle::LinePoints,
            },
            Series {
                name: "etcd".into(),
                points: curve(3.0, 0.08),
                style: SeriesStyle::LinePoints,
            },
            Series {
                name: "redis (appendfsync always)".into(),
                points: curve(1.6, 0.03),
                style: SeriesStyle::Line,
            },
            Series {
                name: "fsync floor".into(),
                points: vec![(1.0, 1.2), (64.0, 1.2)],
                style: SeriesStyle::Dashed,
            },
        ]
    }

    fn latency_chart(series: &[Series]) -> Chart<'_> {
        Chart {
            title: "Write latency p50 against clients",
            x_label: "clients",
            y_label: "p50 latency (ms)",
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series,
        }
    }

    fn latency_bars() -> Vec<(String, f64)> {
        vec![
            ("Meridian".to_string(), 41.7),
            ("etcd".to_string(), 123.0),
            ("redis".to_string(), 40.4),
        ]
    }

    #[test]
    fn line_chart_writes_a_drawn_1000x600_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blank_len = blank_png_len(dir.path());
        let series = latency_series();
        for (name, x_scale, y_scale) in [
            ("lin-lin.png", Scale::Linear, Scale::Linear),
            ("log-lin.png", Scale::Log, Scale::Linear),
            ("lin-log.png", Scale::Linear, Scale::Log),
            ("log-log.png", Scale::Log, Scale::Log),
        ] {
            let path = dir.path().join(name);
            let chart = Chart {
                x_scale,
                y_scale,
                ..latency_chart(&series)
            };
            line_chart(&path, &chart).expect("line chart");
            assert_drawn_png(&path, blank_len);
        }
    }

    #[test]
    fn bar_chart_writes_a_drawn_1000x600_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blank_len = blank_png_len(dir.path());
        for (name, scale) in [("lin.png", Scale::Linear), ("log.png", Scale::Log)] {
            let path = dir.path().join(name);
            bar_chart(
                &path,
                "write p50 at 40 ms delay",
                "ms",
                scale,
                &latency_bars(),
            )
            .expect("bar chart");
            assert_drawn_png(&path, blank_len);
        }
    }

    #[test]
    fn line_chart_draws_every_series_title_and_legend() {
        let series = latency_series();
        let chart = latency_chart(&series);
        let pixels = render_to_buffer(|root| render_line_chart(root, &chart)).expect("render");
        for (i, s) in series.iter().enumerate() {
            let n = colour_pixels(&pixels, colour(i));
            assert!(
                n > 200,
                "series {:?} has only {n} pixels of its colour",
                s.name
            );
        }
        assert!(dark_pixels(&pixels, 300..700, 0..35) > 200, "no title");
        // The legend column is at least 140 px wide, at the right edge.
        assert!(
            dark_pixels(&pixels, 880..1000, 10..130) > 150,
            "no legend text"
        );
        // Axis descriptions and tick labels.
        assert!(
            dark_pixels(&pixels, 0..60, 100..500) > 100,
            "no y axis text"
        );
        assert!(
            dark_pixels(&pixels, 100..800, 540..600) > 200,
            "no x axis text"
        );
    }

    #[test]
    fn dashed_series_is_dashed_and_line_is_solid() {
        let series = vec![
            Series {
                name: "solid".into(),
                points: vec![(0.0, 1.0), (10.0, 1.0)],
                style: SeriesStyle::Line,
            },
            Series {
                name: "floor".into(),
                points: vec![(0.0, 2.0), (10.0, 2.0)],
                style: SeriesStyle::Dashed,
            },
        ];
        let chart = Chart {
            title: "dashes",
            x_label: "x",
            y_label: "y",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
            series: &series,
        };
        let pixels = render_to_buffer(|root| render_line_chart(root, &chart)).expect("render");
        let (solid_px, solid_runs) = best_row_runs(&pixels, colour(0));
        let (dashed_px, dashed_runs) = best_row_runs(&pixels, colour(1));
        assert!(solid_px > 300, "solid line row has {solid_px} pixels");
        assert!(solid_runs <= 2, "solid line broken into {solid_runs} runs");
        assert!(dashed_px > 200, "dashed line row has {dashed_px} pixels");
        assert!(
            dashed_runs >= 20,
            "dashed line has only {dashed_runs} dashes"
        );
    }

    #[test]
    fn bar_chart_draws_every_bar_and_notes_unplottable_values() {
        let mut bars = latency_bars();
        bars.push(("broken".to_string(), 0.0));
        let pixels =
            render_to_buffer(|root| render_bar_chart(root, "bars", "ms", Scale::Log, &bars))
                .expect("render");
        for (i, (name, _)) in bars.iter().take(3).enumerate() {
            let n = colour_pixels(&pixels, colour(i));
            assert!(n > 2000, "bar {name:?} has only {n} pixels of its colour");
        }
        assert_eq!(
            colour_pixels(&pixels, colour(3)),
            0,
            "a bar drawn for 0 on a log axis"
        );
        assert!(
            colour_pixels(&pixels, NOTE_COLOUR) > 50,
            "no note for the 0 value"
        );
    }

    #[test]
    fn log_axes_skip_values_at_or_below_zero() {
        let series = vec![
            Series {
                name: "with zeros".into(),
                points: vec![(0.0, 5.0), (1.0, 0.0), (2.0, 7.0), (4.0, 9.0), (8.0, -1.0)],
                style: SeriesStyle::LinePoints,
            },
            Series {
                name: "all negative".into(),
                points: vec![(1.0, -1.0)],
                style: SeriesStyle::Line,
            },
        ];
        let chart = Chart {
            title: "zeros",
            x_label: "x",
            y_label: "y",
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: &series,
        };
        let pixels = render_to_buffer(|root| render_line_chart(root, &chart)).expect("render");
        assert!(colour_pixels(&pixels, colour(0)) > 100);

        // Nothing left at all: an error, not an empty picture.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("none.png");
        let chart = Chart {
            series: &series[1..],
            ..chart
        };
        let err = line_chart(&path, &chart).expect_err("nothing plottable");
        assert!(err.to_string().contains("nothing to plot"), "{err}");
        assert!(err.to_string().contains("≤ 0"), "{err}");
        assert!(!path.exists(), "a file was written for a failed chart");
    }

    #[test]
    fn empty_charts_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.png");
        let empty = [Series {
            name: "nothing".into(),
            points: Vec::new(),
            style: SeriesStyle::Line,
        }];
        for series in [&[][..], &empty[..]] {
            let chart = Chart {
                series,
                ..latency_chart(&[])
            };
            let err = line_chart(&path, &chart).expect_err("empty chart");
            assert!(err.to_string().contains("nothing to plot"), "{err}");
        }
        let err = bar_chart(&path, "t", "v", Scale::Linear, &[]).expect_err("no bars");
        assert!(err.to_string().contains("no bars"), "{err}");
        let nan = [("a".to_string(), f64::NAN)];
        let err = bar_chart(&path, "t", "v", Scale::Linear, &nan).expect_err("NaN bar");
        assert!(err.to_string().contains("nothing to plot"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn only_png_file_names_are_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.jpg");
        let err = bar_chart(&path, "t", "v", Scale::Linear, &latency_bars()).expect_err("jpg");
        assert!(err.to_string().contains(".png"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn missing_fonts_are_reported_with_the_paths_tried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_a_font = dir.path().join("notes.ttf");
        std::fs::write(&not_a_font, b"hello").expect("write");
        let missing = dir.path().join("missing.ttf");
        let err = find_font(&[missing.clone(), not_a_font.clone()]).expect_err("no font");
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("apt-get install fonts-dejavu-core"), "{msg}");
        assert!(msg.contains(FONT_ENV), "{msg}");
        assert!(
            msg.contains(&format!("{}: not a TrueType", not_a_font.display())),
            "{msg}"
        );
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 10),
            (0..=10).map(f64::from).collect::<Vec<_>>()
        );
        assert_eq!(
            nice_ticks(0.0, 95.0, 10),
            vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
        );
        let labels: Vec<String> = nice_ticks(0.05, 0.75, 10).iter().map(tick_label).collect();
        assert_eq!(labels, ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]);

        // 1..64 clients: 1, 2, 5 a decade, with the other digits as grid lines.
        let (bold, light) = log_ticks(0.8, 80.0, 10);
        assert_eq!(bold, vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        assert!(light.contains(&3.0) && light.contains(&70.0) && !light.contains(&2.0));
        // Within one decade: still labelled.
        let (bold, _) = log_ticks(2.5, 8.0, 10);
        assert_eq!(bold, vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        // Within a factor of 2 between powers: linear ticks.
        let (bold, _) = log_ticks(1.05, 1.9, 10);
        assert!(bold.len() >= 2, "{bold:?}");
        // Fifteen decades: every other decade.
        let (bold, _) = log_ticks(1e-6, 1e9, 10);
        assert!(bold.len() <= 10 && bold.len() >= 5, "{bold:?}");
        let labels: Vec<String> = log_ticks(0.001, 0.5, 10).0.iter().map(tick_label).collect();
        assert_eq!(
            labels,
            [
                "0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5"
            ]
        );
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(format_number(0.0, 4), "0");
        assert_eq!(format_number(-0.0, 4), "0");
        assert_eq!(format_number(41.666, 4), "41.67");
        assert_eq!(format_number(123.0, 4), "123");
        assert_eq!(format_number(0.30000000000000004, 6), "0.3");
        assert_eq!(format_number(2_500_000.0, 4), "2.5e6");
        assert_eq!(format_number(0.00012, 4), "1.2e-4");
        assert_eq!(format_number(99_999.0, 6), "99999");
    }

    /// Writes sample charts for a person to look at: `MERIDIAN_PLOT_SAMPLES=/tmp/plot-samples
    /// cargo test -p meridian-bench plot::tests::samples`. Without the variable it still
    /// renders them, into a temporary directory.
    #[test]
    fn samples() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = match std::env::var_os("MERIDIAN_PLOT_SAMPLES") {
            Some(d) => PathBuf::from(d),
            None => tmp.path().to_path_buf(),
        };
        std::fs::create_dir_all(&dir).expect("create samples dir");
        let blank_len = blank_png_len(&dir);

        let series = latency_series();
        let path = dir.join("latency-log-x.png");
        line_chart(&path, &latency_chart(&series)).expect("latency");
        assert_drawn_png(&path, blank_len);

        let throughput: Vec<Series> = [("Meridian", 9000.0), ("etcd", 4000.0), ("redis", 60000.0)]
            .iter()
            .map(|&(name, top)| Series {
                name: name.into(),
                points: (0..=6)
                    .map(|k| {
                        let c = f64::from(1 << k);
                        (c, top * c / (c + 8.0))
                    })
                    .collect(),
                style: SeriesStyle::LinePoints,
            })
            .collect();
        let path = dir.join("throughput-log-log.png");
        let chart = Chart {
            title: "Durable write throughput",
            x_label: "clients",
            y_label: "writes/s",
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: &throughput,
        };
        line_chart(&path, &chart).expect("throughput");
        assert_drawn_png(&path, blank_len);

        let lag = vec![
            Series {
                name: "replication lag p99".into(),
                points: (0..60)
                    .map(|s| (f64::from(s), 3.0 + (f64::from(s) * 0.7).sin()))
                    .collect(),
                style: SeriesStyle::Line,
            },
            Series {
                name: "target (5 ms)".into(),
                points: vec![(0.0, 5.0), (59.0, 5.0)],
                style: SeriesStyle::Dashed,
            },
            Series {
                name:
                    "a series with a very long name that will not fit in the legend column at all"
                        .into(),
                points: vec![(30.0, 2.0)],
                style: SeriesStyle::Line,
            },
        ];
        let path = dir.join("lag-linear.png");
        let chart = Chart {
            title: "Replication lag at 1000 writes/s",
            x_label: "time (s)",
            y_label: "lag (ms)",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
            series: &lag,
        };
        line_chart(&path, &chart).expect("lag");
        assert_drawn_png(&path, blank_len);

        let path = dir.join("bars-log.png");
        let mut bars = latency_bars();
        bars.push(("Meridian (no fsync)".to_string(), 0.35));
        bars.push(("broken run".to_string(), 0.0));
        bar_chart(
            &path,
            "write p50 at 40 ms delay",
            "p50 latency (ms)",
            Scale::Log,
            &bars,
        )
        .expect("log bars");
        assert_drawn_png(&path, blank_len);

        let path = dir.join("bars-linear.png");
        let bars = vec![
            ("Meridian".to_string(), 8200.0),
            ("etcd".to_string(), 3900.0),
            ("redis".to_string(), 61000.0),
            ("regression vs last run".to_string(), -1200.0),
            ("not measured".to_string(), f64::NAN),
        ];
        bar_chart(
            &path,
            "Writes per second at 16 clients",
            "writes/s",
            Scale::Linear,
            &bars,
        )
        .expect("linear bars");
        assert_drawn_png(&path, blank_len);
    }
}
