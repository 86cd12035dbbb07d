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

/// One chart: a y axis in one unit and its groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<Group>,
}

impl Panel {
    pub fn new(title: impl Into<String>, y_label: impl Into<String>, groups: Vec<Group>) -> Panel {
        Panel {
            title: title.into(),
            y_label: y_label.into(),
            groups: groups.into_iter().filter(|g| !g.bars.is_empty()).collect(),
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
        draw_panel(&root, area, panel, &series).map_err(e)?;
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
    // Entries wrap onto a second row when they do not fit the panel's width.
    let (left, _) = chart.backend_coord(&(-0.5, 0.0));
    let right = area.get_pixel_range().0.end - 10;
    let width = |name: &str| 18 + 8 * name.chars().count() as i32 + 24;
    let mut placed = Vec::new();
    let (mut x, mut row) = (left, 0);
    for name in names {
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
