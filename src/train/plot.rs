//! Training curves as PNG (plotters, with an embedded DejaVu Sans Mono so no system font is
//! needed): `loss.png` (loss, LM loss, aux loss per step) and `lr.png`.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::state::StepRow;
use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

/// One named curve.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub color: RGBColor,
}

/// Draws `series` into a 900x500 PNG at `path`.
pub fn line_chart(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    REGISTER.call_once(|| {
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let err = |e: String| Error::Input(format!("{}: drawing the chart: {e}", path.display()));
    let pts = series.iter().flat_map(|s| s.points.iter());
    let finite: Vec<&(f64, f64)> = pts.filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if finite.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &&(x, y) in &finite {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-12);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .y_label_formatter(&|v| format!("{v:.3e}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Writes `loss.png` and `lr.png` for `rows` into `dir`.
pub fn plot_run(dir: &Path, rows: &[StepRow]) -> Result<()> {
    let by_step = |f: fn(&StepRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.step as f64, f(r))).collect()
    };
    let mut losses = vec![
        Series {
            label: "loss",
            points: by_step(|r| r.loss),
            color: BLUE,
        },
        Series {
            label: "LM loss",
            points: by_step(|r| r.lm_loss),
            color: RED,
        },
    ];
    if rows.iter().any(|r| r.aux_loss != 0.0) {
        losses.push(Series {
            label: "aux loss",
            points: by_step(|r| r.aux_loss),
            color: GREEN,
        });
    }
    line_chart(
        &dir.join("loss.png"),
        "training loss",
        "optimizer step",
        &losses,
    )?;
    line_chart(
        &dir.join("lr.png"),
        "learning rate",
        "optimizer step",
        &[Series {
            label: "lr",
            points: by_step(|r| r.lr),
            color: BLUE,
        }],
    )
}
