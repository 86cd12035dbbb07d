//! PNG plots beside the results JSON: grouped bars (median) with min/max whiskers, the
//! measured value beside the reference measured in the same run.
//!
//! Text is drawn with a TrueType font read from the system (DejaVu Sans or Liberation Sans,
//! Debian's `fonts-dejavu-core`), or from the file named by `KRUN_BENCH_FONT`.
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

/// One bar: the median of a measurement with its min and max.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// The series the bar belongs to (one colour and one legend entry per series).
    pub series: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Bar {
    /// A bar from repeated measurements (median, min, max of the finite values); `None` when
    /// there is none.
    pub fn from_values(series: &str, values: &[f64]) -> Option<Bar> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(Bar {
            series: series.to_string(),
            median: *v.get(v.len() / 2)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }

    /// A bar from one measurement (no spread), `None` when it is absent or not finite.
    pub fn single(series: &str, value: Option<f64>) -> Option<Bar> {
        value.and_then(|v| Bar::from_values(series, &[v]))
    }

    /// A bar from median, min and max already computed; `None` if the median is missing.
    pub fn spread(
        series: &str,
        median: Option<f64>,
        min: Option<f64>,
        max: Option<f64>,
    ) -> Option<Bar> {
        let m = median.filter(|m| m.is_finite())?;
        Some(Bar {
            series: series.to_string(),
            median: m,
            min: min.filter(|x| x.is_finite()).unwrap_or(m).min(m),
            max: max.filter(|x| x.is_finite()).unwrap_or(m).max(m),
        })
    }
}

/// Bars side by side under one x label.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The x label; `\n` starts a second line.
    pub label: String,
    pub bars: Vec<Bar>,
}

impl Group {
    /// A group of the bars that are present.
    pub fn new(label: impl Into<String>, bars: impl IntoIterator<Item = Option<Bar>>) -> Group {
        Group {
            label: label.into(),
            bars: bars.into_iter().flatten().collect(),
        }
    }
}

/// One chart: a y axis in one unit and its groups (bars), or its series (lines against a
/// numeric x), or its lanes (a timeline).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<Group>,
    /// Line chart: x axis label and whether it is logarithmic.
    pub x_label: String,
    pub log_x: bool,
    pub series: Vec<Series>,
    pub lanes: Vec<Lane>,
}

/// A line through points `(x, median)` with min/max whiskers at each point.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// `(x, median, min, max)`, x ascending.
    pub points: Vec<(f64, f64, f64, f64)>,
    /// Drawn dashed-looking (thin, with hollow markers): a model, not a measurement.
    pub model: bool,
}

/// One row of a timeline: coloured spans and point marks on a shared time axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Lane {
    pub label: String,
    /// `(from, to, kind)`: the kind names the colour and the legend entry.
    pub spans: Vec<(f64, f64, String)>,
    /// `(at, kind)`: a vertical mark.
    pub marks: Vec<(f64, String)>,
}

impl Panel {
    pub fn new(title: impl Into<String>, y_label: impl Into<String>, groups: Vec<Group>) -> Panel {
        Panel {
            title: title.into(),
            y_label: y_label.into(),
            groups: groups.into_iter().filter(|g| !g.bars.is_empty()).collect(),
            x_label: String::new(),
            log_x: false,
            series: Vec::new(),
            lanes: Vec::new(),
        }
    }

    /// A line chart (series without points are left out).
    pub fn lines(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
        log_x: bool,
        series: Vec<Series>,
    ) -> Panel {
        Panel {
            x_label: x_label.into(),
            log_x,
            series: series
                .into_iter()
                .filter(|s| s.points.iter().any(|p| p.1.is_finite()))
                .collect(),
            ..Panel::new(title, y_label, Vec::new())
        }
    }

    /// A timeline with one lane per row; the x axis is `x_label`.
    pub fn timeline(
        title: impl Into<String>,
        x_label: impl Into<String>,
        lanes: Vec<Lane>,
    ) -> Panel {
        Panel {
            x_label: x_label.into(),
            lanes,
            ..Panel::new(title, "", Vec::new())
        }
    }
}

/// A whole picture: a title, a note under it and panels stacked vertically.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Figure {
    pub title: String,
    /// One line under the title (what the whiskers are, where it ran, why it was skipped).
    pub note: String,
    pub panels: Vec<Panel>,
}

const FONT: &str = "sans-serif";
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// Registers the font once per process; the error names where it looked.
fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let paths: Vec<String> = std::env::var("KRUN_BENCH_FONT")
                .ok()
                .into_iter()
                .chain(FONT_PATHS.iter().map(|p| p.to_string()))
                .collect();
            let (path, bytes) = paths
                .iter()
                .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
                .ok_or_else(|| {
                    format!(
                        "no TrueType font for the plot (looked at {}; install fonts-dejavu-core \
                         or set KRUN_BENCH_FONT)",
                        paths.join(", ")
                    )
                })?;
            // Leaked once per process: the font registry keeps `&'static` bytes.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            for style in [FontStyle::Normal, FontStyle::Bold] {
                register_font(FONT, style, bytes)
                    .map_err(|_| format!("{path}: not a usable TrueType font"))?;
            }
            Ok(())
        })
        .clone()
}

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 440;
const HEADER: u32 = 70;

/// Colours by series, in order of first appearance.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws `figure` into a PNG at `path`.
pub fn write_png(path: &Path, figure: &Figure) -> Result<(), String> {
    font()?;
    let height = HEADER + PANEL_HEIGHT * figure.panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let (header, body) = root.split_vertically(HEADER);
    header
        .draw(&Text::new(
            figure.title.clone(),
            (12, 10),
            (FONT, 24, FontStyle::Bold).into_font(),
        ))
        .map_err(e)?;
    header
        .draw(&Text::new(
            figure.note.clone(),
            (12, 42),
            (FONT, 15).into_font().color(&RGBColor(80, 80, 80)),
        ))
        .map_err(e)?;
    let series = series_order(figure);
    if figure.panels.is_empty() {
        body.draw(&Text::new(
            "no measurement",
            (12, 20),
            (FONT, 18).into_font(),
        ))
        .map_err(e)?;
    }
    let areas = body.split_evenly((figure.panels.len().max(1), 1));
    for (panel, area) in figure.panels.iter().zip(&areas) {
        if !panel.series.is_empty() {
            draw_lines(&root, area, panel, &series).map_err(e)?;
        } else if !panel.lanes.is_empty() {
            draw_timeline(&root, area, panel, &series).map_err(e)?;
        } else {
            draw_panel(&root, area, panel, &series).map_err(e)?;
        }
    }
    root.present().map_err(e)
}

/// Every series name, in order of first appearance.
fn series_order(figure: &Figure) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for b in figure
        .panels
        .iter()
        .flat_map(|p| &p.groups)
        .flat_map(|g| &g.bars)
    {
        if !names.contains(&b.series) {
            names.push(b.series.clone());
        }
    }
    for p in &figure.panels {
        for n in p
            .series
            .iter()
            .map(|s| &s.name)
            .chain(p.lanes.iter().flat_map(|l| {
                l.spans
                    .iter()
                    .map(|s| &s.2)
                    .chain(l.marks.iter().map(|m| &m.1))
            }))
        {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
}

fn colour(series: &[String], name: &str) -> RGBColor {
    let i = series.iter().position(|s| s == name).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_panel<'a>(
    root: &Area<'a>,
    area: &Area<'a>,
    panel: &Panel,
    series: &[String],
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>> {
    let n = panel.groups.len().max(1) as f64;
    let bars = || panel.groups.iter().flat_map(|g| &g.bars);
    let medians = bars().map(|b| b.median).fold(0.0f64, f64::max);
    let whiskers = bars().map(|b| b.max.max(b.median)).fold(0.0f64, f64::max);
    // One outlier run must not flatten every bar: the axis stops at 3x the largest median
    // and a longer whisker ends in an arrow with its max written beside it.
    let top = whiskers.min(3.0 * medians);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title.clone(), (FONT, 18))
        .margin(10)
        .x_label_area_size(84)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0.0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc(panel.y_label.clone())
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    for (gi, g) in panel.groups.iter().enumerate() {
        let width = 0.8 / g.bars.len().max(1) as f64;
        for (bi, b) in g.bars.iter().enumerate() {
            let x0 = gi as f64 - 0.4 + bi as f64 * width;
            let (x1, xc) = (x0 + width * 0.9, x0 + width * 0.45);
            let c = colour(series, &b.series);
            chart.draw_series([Rectangle::new([(x0, 0.0), (x1, b.median)], c.filled())])?;
            let cap = width * 0.2;
            let hi = b.max.min(top);
            chart.draw_series([
                PathElement::new(vec![(xc, b.min), (xc, hi)], BLACK.stroke_width(1)),
                PathElement::new(vec![(xc - cap, b.min), (xc + cap, b.min)], BLACK),
            ])?;
            if b.max > top {
                let (ax, ay) = chart.backend_coord(&(xc, top));
                root.draw(&PathElement::new(
                    vec![(ax - 5, ay + 8), (ax, ay), (ax + 5, ay + 8)],
                    BLACK,
                ))?;
                root.draw(&Text::new(
                    format!("max {}", short(b.max)),
                    (ax + 4, ay + 2),
                    (FONT, 11),
                ))?;
            } else {
                chart.draw_series([PathElement::new(
                    vec![(xc - cap, hi), (xc + cap, hi)],
                    BLACK,
                )])?;
            }
            // The median's value above the bar (or above a whisker that ends lower).
            let label_at = if b.max > top {
                b.median
            } else {
                hi.max(b.median)
            };
            let (px, py) = chart.backend_coord(&(xc, label_at));
            root.draw(&Text::new(
                short(b.median),
                (px, py - 3),
                TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom)),
            ))?;
        }
        let (px, py) = chart.backend_coord(&(gi as f64, 0.0));
        for (li, line) in g.label.split('\n').enumerate() {
            root.draw(&Text::new(
                line.to_string(),
                (px, py + 6 + 15 * li as i32),
                TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
    }
    // Legend: the series of this panel, one row under the x labels.
    let mut names: Vec<&str> = Vec::new();
    for b in panel.groups.iter().flat_map(|g| &g.bars) {
        if !names.contains(&b.series.as_str()) {
            names.push(&b.series);
        }
    }
    let (left, _) = chart.backend_coord(&(-0.5, 0.0));
    legend(root, area, left, &names, series)
}

/// The legend of a panel: one coloured square and name per entry, under the x axis.
fn legend<'a>(
    root: &Area<'a>,
    area: &Area<'a>,
    left: i32,
    names: &[&str],
    series: &[String],
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>> {
    // Entries wrap onto a second row when they do not fit the panel's width.
    let right = area.get_pixel_range().0.end - 10;
    let width = |name: &str| 18 + 8 * name.chars().count() as i32 + 24;
    let mut placed = Vec::new();
    let (mut x, mut row) = (left, 0);
    for &name in names {
        if x + width(name) > right && x > left {
            (x, row) = (left, row + 1);
        }
        placed.push((name, x, row));
        x += width(name);
    }
    let bottom = area.get_pixel_range().1.end - 20 - 18 * row;
    for (name, x, r) in placed {
        let y = bottom + 18 * r;
        root.draw(&Rectangle::new(
            [(x, y), (x + 12, y + 12)],
            colour(series, name).filled(),
        ))?;
        root.draw(&Text::new(name.to_string(), (x + 18, y), (FONT, 13)))?;
    }
    Ok(())
}

/// A line chart: each series a polyline with markers and min/max whiskers.
fn draw_lines<'a>(
    root: &Area<'a>,
    area: &Area<'a>,
    panel: &Panel,
    series: &[String],
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>> {
    let pts = || {
        panel
            .series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|p| p.0.is_finite() && p.1.is_finite() && (!panel.log_x || p.0 > 0.0))
    };
    let fx = |x: f64| if panel.log_x { x.log10() } else { x };
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (0.0f64, f64::MIN);
    let medians: Vec<f64> = pts().map(|p| p.1).collect();
    let top_median = medians.iter().copied().fold(f64::MIN, f64::max);
    for p in pts() {
        x0 = x0.min(fx(p.0));
        x1 = x1.max(fx(p.0));
        y0 = y0.min(p.1);
        y1 = y1.max(p.1);
        if p.2.is_finite() {
            y0 = y0.min(p.2);
        }
        if p.3.is_finite() {
            y1 = y1.max(p.3.min(3.0 * top_median.abs().max(1e-12)));
        }
    }
    if x0 >= x1 {
        (x0, x1) = (x0 - 0.5, x0 + 0.5);
    }
    let pad = (x1 - x0) * 0.04;
    let span = (y1 - y0).max(1e-12);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title.clone(), (FONT, 18))
        .margin(10)
        .x_label_area_size(70)
        .y_label_area_size(70)
        .build_cartesian_2d(x0 - pad..x1 + pad, y0 - 0.02 * span..y1 + 0.1 * span)?;
    let log = panel.log_x;
    chart
        .configure_mesh()
        .y_desc(panel.y_label.clone())
        .x_label_formatter(&|v| {
            if log {
                short(10f64.powf(*v))
            } else {
                short(*v)
            }
        })
        .y_label_formatter(&|v| short(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    for s in &panel.series {
        let c = colour(series, &s.name);
        let p: Vec<(f64, f64, f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log || p.0 > 0.0))
            .map(|p| (fx(p.0), p.1, p.2, p.3))
            .collect();
        let width = if s.model { 1 } else { 2 };
        chart.draw_series([PathElement::new(
            p.iter().map(|q| (q.0, q.1)).collect::<Vec<_>>(),
            c.stroke_width(width),
        )])?;
        for q in &p {
            if s.model {
                chart.draw_series([Circle::new((q.0, q.1), 4, c.stroke_width(1))])?;
            } else {
                chart.draw_series([Circle::new((q.0, q.1), 4, c.filled())])?;
                if q.2.is_finite() && q.3.is_finite() && q.3 > q.2 {
                    chart.draw_series([PathElement::new(
                        vec![(q.0, q.2), (q.0, q.3.min(y1 + 0.1 * span))],
                        c.stroke_width(1),
                    )])?;
                }
            }
        }
    }
    let names: Vec<&str> = panel.series.iter().map(|s| s.name.as_str()).collect();
    let (left, _) = chart.backend_coord(&(x0 - pad, 0.0));
    x_label(
        root,
        &chart.backend_coord(&(x1 + pad, y0 - 0.02 * span)),
        &panel.x_label,
    )?;
    legend(root, area, left, &names, series)
}

/// A timeline: one lane per row, spans as coloured boxes, marks as vertical lines.
fn draw_timeline<'a>(
    root: &Area<'a>,
    area: &Area<'a>,
    panel: &Panel,
    series: &[String],
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>> {
    let times = panel.lanes.iter().flat_map(|l| {
        l.spans
            .iter()
            .flat_map(|s| [s.0, s.1])
            .chain(l.marks.iter().map(|m| m.0))
    });
    let (mut t0, mut t1) = (0.0f64, f64::MIN);
    for t in times.filter(|t| t.is_finite()) {
        t0 = t0.min(t);
        t1 = t1.max(t);
    }
    if t1 <= t0 {
        t1 = t0 + 1.0;
    }
    let n = panel.lanes.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title.clone(), (FONT, 18))
        .margin(10)
        .x_label_area_size(70)
        .y_label_area_size(220)
        .build_cartesian_2d(t0..t1 * 1.01, -0.5f64..n - 0.5)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_label_formatter(&|v| short(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    let mut names: Vec<&str> = Vec::new();
    for (i, lane) in panel.lanes.iter().enumerate() {
        let y = n - 1.0 - i as f64;
        for (a, b, kind) in &lane.spans {
            chart.draw_series([Rectangle::new(
                [(*a, y - 0.3), (*b, y + 0.3)],
                colour(series, kind).filled(),
            )])?;
            if !names.contains(&kind.as_str()) {
                names.push(kind);
            }
        }
        for (at, kind) in &lane.marks {
            chart.draw_series([PathElement::new(
                vec![(*at, y - 0.42), (*at, y + 0.42)],
                colour(series, kind).stroke_width(3),
            )])?;
            if !names.contains(&kind.as_str()) {
                names.push(kind);
            }
        }
        let (px, py) = chart.backend_coord(&(t0, y));
        root.draw(&Text::new(
            lane.label.clone(),
            (px - 8, py),
            TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    let (left, _) = chart.backend_coord(&(t0, 0.0));
    x_label(
        root,
        &chart.backend_coord(&(t1 * 1.01, -0.5)),
        &panel.x_label,
    )?;
    legend(root, area, left, &names, series)
}

/// The x axis's name, right-aligned under the tick labels at the axis's right end.
fn x_label<'a>(
    root: &Area<'a>,
    at: &(i32, i32),
    text: &str,
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>> {
    root.draw(&Text::new(
        text.to_string(),
        (at.0, at.1 + 24),
        TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Right, VPos::Top)),
    ))
}

/// A value for a bar label: 3 significant digits.
fn short(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_take_median_min_max_and_skip_missing() {
        let b = Bar::from_values("x", &[3.0, f64::NAN, 1.0, 2.0]).unwrap();
        assert_eq!((b.median, b.min, b.max), (2.0, 1.0, 3.0));
        assert!(Bar::from_values("x", &[]).is_none());
        assert!(Bar::single("x", None).is_none());
        let s = Bar::spread("x", Some(2.0), None, Some(5.0)).unwrap();
        assert_eq!((s.min, s.max), (2.0, 5.0));
        let g = Group::new("g", [Bar::single("a", Some(1.0)), None]);
        assert_eq!(g.bars.len(), 1);
        assert_eq!(short(1234.5), "1234");
        assert_eq!(short(0.01234), "0.0123");
    }
}
